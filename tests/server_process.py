"""A second MultiHead server in its own process (`python -m multihead_nb serve`) on a loopback port, for the tests of
the CLI and of remote heads: started, its URL read from the line it prints, paused, resumed or killed."""

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class ServerProcess:
    def __init__(self, *args: str):
        cmd = [sys.executable, "-m", "multihead_nb", "serve", "--port", "0", "--device", "cpu", "--dtype", "float32",
               "--pool", "16MiB", "--page-bytes", "8KiB", *args]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                     cwd=ROOT)
        self.banner = self.proc.stdout.readline().strip()
        line = self.proc.stdout.readline().strip()
        if not line.startswith("serving on "):
            self.proc.kill()
            raise RuntimeError(f"the server did not start: {self.banner!r} {line!r} {self.proc.stderr.read()}")
        self.url = line.split()[-1]

    def pause(self):
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self):
        self.proc.send_signal(signal.SIGCONT)

    def kill(self):
        self.proc.kill()
        self.proc.wait(timeout=30)

    def stop(self) -> int:
        """Ctrl-C, as a user would; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout=30)
