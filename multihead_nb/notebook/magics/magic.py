"""IPython glue: the `%%head`, `%%team` and `%mh` magics, their `%config` defaults, and (un)loading the extension.

Owns: argument strings (IPython's `magic_arguments`), the choice of the default workspace, showing results, and
turning every bad input or engine error into a one-line `UsageError`. Knows nothing of tensors or pages: each
magic parses (`parsers.py`) then calls one plain function (`commands.py`).
"""

from __future__ import annotations

import functools
import sys

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import MagicArgumentParser, argument, magic_arguments, parse_argstring
from IPython.utils.text import dedent
from traitlets import Integer, Unicode

from ...errors import MultiHeadError
from . import commands, parsers

SUBCOMMANDS = ("status", "heads", "pages", "models", "dashboard", "pool", "reset", "run", "load")


def _one_line_errors(fn):
    """Every error a user can cause (a `MultiHeadError`) leaves the magic as a one-line UsageError; anything else is
    a bug and surfaces as one, with its traceback."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        except (UsageError, MultiHeadError) as e:
            raise UsageError(parsers.first_line(e)) from None

    return wrapper


@magics_class
class MultiHeadMagics(Magics):
    """`%%head`, `%%team` and `%mh`. Defaults: `%config MultiHeadMagics.default_model = "..."` and so on."""

    default_model = Unicode("", help="Model of a %%head without --model ('' makes --model required).").tag(config=True)
    pool = Unicode("1GiB", help="Size of the default workspace's arena.").tag(config=True)
    page_bytes = Unicode("256KiB", help="Bytes per page of the default workspace.").tag(config=True)
    device = Unicode("auto", help="Device of the default workspace: auto, cpu, cuda[:N].").tag(config=True)
    dtype = Unicode("auto", help="dtype of the default workspace: auto, float32, bfloat16, float16.").tag(config=True)
    max_tokens = Integer(None, allow_none=True, help="max_tokens of a %%head without --max-tokens.").tag(config=True)
    cpu_kernel = Unicode("auto", help="The default workspace's fused CPU kernel: "
                                      f"{', '.join(parsers.CPU_KERNEL_WORDS)}.").tag(config=True)

    # ---- the default workspace ----------------------------------------------------------------------------
    def workspace_options(self) -> dict:
        return {"pool": self.pool, "page_bytes": self.page_bytes, "device": self.device, "dtype": self.dtype,
                "cpu_kernel": parsers.parse_cpu_kernel(self.cpu_kernel)}

    def workspace(self):
        """The default workspace (`mh.workspace()`), created with this magic's options when there is none."""
        from ...workspace import default

        current = default.current()
        if current is not None:  # it exists already (maybe created with other options): use it as it is
            return current
        return default.workspace(**self.workspace_options())  # bad options are an error, never a silent default

    # ---- %%head -------------------------------------------------------------------------------------------
    @cell_magic
    @_one_line_errors
    @magic_arguments()
    @argument("name", help="the head's name (a Python identifier)")
    @argument("--model", "-m", help="hub id, checkpoint folder, or openai:http://HOST:PORT/v1 (a remote engine) "
                                    "(default: MultiHeadMagics.default_model)")
    @argument("--temperature", type=float)
    @argument("--top-p", type=float)
    @argument("--top-k", type=int)
    @argument("--max-tokens", type=int)
    @argument("--stop", action="append", help="a stop string (repeatable)")
    @argument("--seed", type=int)
    @argument("--quota", help="the head's share of K/V pages: '25%%' or a size like '64MiB'")
    @argument("--weight", type=float, help="fair share relative to other heads")
    @argument("--max-concurrent", type=int)
    @argument("--backend", help="auto (default), native, exl2 or remote")
    @argument("--region", help="EXL2 models: the model's region of the pool, '25%%' or a size like '2GiB'")
    @argument("--quantize", help="native models: the checkpoint quantized at load: q8_0, q4_0, q4_1, q5_0, q5_1")
    @argument("--activations", help="native models in the CPU kernel: int8 (default) or float32")
    @argument("--kv-cache", help="native models in the CPU kernel: bf16 (default) or int8 (~1.8x the tokens a page)")
    @argument("--remote-model", help="--model openai:http://HOST:PORT/v1: the engine's model name")
    @argument("--api-key", help="remote heads: the engine's API key (default: $MULTIHEAD_REMOTE_API_KEY)")
    @argument("--timeout", type=float, help="remote heads: seconds the engine may stay silent (default 60)")
    @argument("--retries", type=int, help="remote heads: tries again on connection errors (default 2)")
    def head(self, line, cell=""):
        """Define or redefine a head; the cell body is its system prompt."""
        args = parse_argstring(self.head, line)
        model = args.model or self.default_model
        if not model:
            raise UsageError(f"%%head {args.name}: --model is required (or set %config MultiHeadMagics.default_model)")
        options = parsers.head_options(args, self.max_tokens)
        summary = commands.define_head(self.workspace(), args.name, model, dedent(cell or "").strip(), **options)
        print(summary)

    # ---- %%team -------------------------------------------------------------------------------------------
    @cell_magic
    @_one_line_errors
    @magic_arguments()
    @argument("-o", "--output", metavar="NAME", help="also store the TeamRun in this notebook variable")
    @argument("--var", action="append", metavar="NAME=VALUE", help="a run variable (repeatable)")
    @argument("--save", metavar="FILE", help="also save the team and its heads to a team file (.yaml or .json)")
    @argument("--no-run", action="store_true", help="do not run (with --save: only write the file)")
    def team(self, line, cell=""):
        """Run a team: one step per line, `head: prompt template`; returns the TeamRun."""
        args = parse_argstring(self.team, line)
        if args.output is not None and not args.output.isidentifier():
            raise UsageError(f"-o expects a Python variable name, got {args.output!r}")
        steps = parsers.parse_team(cell or "")
        given = parsers.parse_vars(args.var)
        if args.save:
            print(commands.save_team(self.workspace(), steps, given, args.save))
        if args.no_run:
            return None
        run = commands.start_team(self.workspace(), steps, given, self.shell.user_ns if self.shell else None)
        if args.output:
            self.shell.user_ns[args.output] = run
        from ..widgets.dashboard import live_team_view

        view = live_team_view(run)
        try:
            run.wait()
        except KeyboardInterrupt:
            run.cancel()
            print(f"team run {run.id} cancelled; its pages are free again", file=sys.stderr)
        finally:
            if view is not None:
                view.finish()
        if view is None and run.error is None:
            for head, text in run.outputs.items():
                print(f"--- {head} ---\n{text}")
        return run

    # ---- %mh ----------------------------------------------------------------------------------------------
    @line_magic
    @_one_line_errors
    def mh(self, line=""):
        """%mh status | heads | pages | models | dashboard | pool SIZE [--device D] [--page-bytes B] [--dtype T]
        [--cpu-kernel K] | reset | run HEAD PROMPT... | load FILE [-o NAME] [--model M] [--prefix P]"""
        words = line.split(None, 1)
        cmd, rest = (words[0], words[1] if len(words) > 1 else "") if words else ("status", "")
        if cmd not in SUBCOMMANDS:
            raise UsageError(f"unknown %mh subcommand {cmd!r}; known: {', '.join(SUBCOMMANDS)}")
        return getattr(self, f"_mh_{cmd}")(rest)

    def _no_args(self, cmd: str, rest: str) -> None:
        if rest.strip():
            raise UsageError(f"%mh {cmd} takes no arguments, got {rest.strip()!r}")

    def _mh_status(self, rest):
        self._no_args("status", rest)
        print(commands.status(self.workspace()))

    def _mh_heads(self, rest):
        self._no_args("heads", rest)
        return commands.heads(self.workspace())

    def _mh_pages(self, rest):
        self._no_args("pages", rest)
        return commands.pages(self.workspace())

    def _mh_models(self, rest):
        self._no_args("models", rest)
        return commands.models()

    def _mh_dashboard(self, rest):
        p = MagicArgumentParser(prog="%mh dashboard")
        p.add_argument("--interval", type=float, default=0.1)
        args = p.parse_argstring(rest)
        if args.interval <= 0:
            raise UsageError(f"--interval must be positive, got {args.interval}")
        return commands.dashboard(self.workspace(), interval=args.interval)

    def _mh_pool(self, rest):
        p = MagicArgumentParser(prog="%mh pool")
        p.add_argument("size")
        p.add_argument("--device")
        p.add_argument("--page-bytes")
        p.add_argument("--dtype")
        p.add_argument("--cpu-kernel", help=f"one of {', '.join(parsers.CPU_KERNEL_WORDS)}")
        args = p.parse_argstring(rest)
        parsers.parse_size_arg(args.size, "pool size")
        if args.page_bytes is not None:
            parsers.parse_size_arg(args.page_bytes, "--page-bytes")
        options = self.workspace_options()
        options.update(pool=args.size, **{k: v for k, v in
                                          (("device", args.device), ("page_bytes", args.page_bytes),
                                           ("dtype", args.dtype)) if v is not None})
        if args.cpu_kernel is not None:
            options["cpu_kernel"] = parsers.parse_cpu_kernel(args.cpu_kernel)
        ws = commands.new_workspace(**options)  # raises before anything changes when an option is bad
        self.pool, self.page_bytes, self.device, self.dtype = (
            options["pool"], options["page_bytes"], options["device"], options["dtype"])
        if args.cpu_kernel is not None:
            self.cpu_kernel = args.cpu_kernel
        print(repr(ws))

    def _mh_reset(self, rest):
        self._no_args("reset", rest)
        ws = commands.new_workspace(**self.workspace_options())
        print(repr(ws))

    def _mh_load(self, rest):
        p = MagicArgumentParser(prog="%mh load")
        p.add_argument("file", help="a team file (.yaml or .json) or a built-in team: code, research, creative")
        p.add_argument("-o", "--output", metavar="NAME", help="store the Team in this notebook variable")
        p.add_argument("--model", help="run every head of the team on this model")
        p.add_argument("--prefix", default="", help="prefix every head's name with this")
        args = p.parse_argstring(rest)
        if args.output is not None and not args.output.isidentifier():
            raise UsageError(f"-o expects a Python variable name, got {args.output!r}")
        team, summary = commands.load_team(self.workspace(), args.file, model=args.model, prefix=args.prefix)
        if args.output:
            self.shell.user_ns[args.output] = team
        print(summary)
        return team

    def _mh_run(self, rest):
        parts = rest.split(None, 1)
        if len(parts) < 2:
            raise UsageError("usage: %mh run HEAD PROMPT...")
        ws = self.workspace()
        ws.head(parts[0])  # unknown head: a one-line error before anything is queued
        commands.run_prompt(ws, parts[0], parsers.join_words([parts[1]]))


def load_ipython_extension(ipython) -> None:
    magics = MultiHeadMagics(shell=ipython, parent=ipython)
    ipython.register_magics(magics)
    if magics not in ipython.configurables:
        ipython.configurables.append(magics)


def unload_ipython_extension(ipython) -> None:
    manager = ipython.magics_manager
    manager.registry.pop("MultiHeadMagics", None)
    for kind, names in (("line", ("mh",)), ("cell", ("head", "team"))):
        for name in names:
            manager.magics[kind].pop(name, None)
    ipython.configurables[:] = [c for c in ipython.configurables if not isinstance(c, MultiHeadMagics)]
