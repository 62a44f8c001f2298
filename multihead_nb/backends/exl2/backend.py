"""The EXL2 backend: ExLlamaV2 models on CUDA, their K/V in a region of the arena (a contiguous run of pages).

Owns: detecting EXL2 checkpoints for `backend="auto"`, sizing the region (`region=`: a share of the pool's pages,
"25%" or 0.25, or a size, "512MiB"; `DEFAULT_REGION` when not given), and building the runner over the region's
pages with the model's own 256-token page pool (`RegionPool`). Knows nothing of the pool's accounting: the workspace
reserves the region (`PagePool.reserve_run`) between `plan` and `build`. Imports no exllamav2 until a model needs it.
"""

from __future__ import annotations

import torch

from ...config import parse_pages
from ...errors import ConfigError
from ..base import BuiltModel, LoadTarget, ModelPlan, check_options, eos_ids

DEFAULT_REGION = "25%"  # of the pool's pages, for an EXL2 model whose first head gives no region=


class Exl2Backend:
    name = "exl2"
    options = ("region",)

    def detects(self, model: str) -> bool:
        from .checkpoint import is_exl2_checkpoint

        return is_exl2_checkpoint(model)

    def key(self, model: str, options: dict | None = None) -> str:
        from ..native.backend import model_key

        return model_key(model)

    def plan(self, model: str, target: LoadTarget, options: dict) -> ModelPlan:
        from .checkpoint import read_exl2_spec
        from .region import Exl2Region

        region = check_options(self, model, options).get("region", DEFAULT_REGION)
        self.check(target.device)  # a clear error naming what is missing, before anything is reserved
        spec = read_exl2_spec(model)
        n = parse_pages(region, target.arena.num_pages, target.page_bytes, what="region", round_up=True)
        Exl2Region(0, n, target.page_bytes, spec.num_layers, spec.num_kv_heads, spec.head_dim)  # too small: error
        return ModelPlan(self.key(model), spec.weight_bytes, region_pages=n, detail=spec)

    def build(self, plan: ModelPlan, target: LoadTarget, region: list[int] | None) -> BuiltModel:
        from ...memory.region_pool import RegionPool, region_owner
        from ..native.tokenizer import load_tokenizer
        from .region import Exl2Region

        spec = plan.detail
        assert region is not None and len(region) == plan.region_pages
        geometry = Exl2Region.from_pages(region, target.page_bytes, spec.num_layers, spec.num_kv_heads, spec.head_dim)
        runner = self.runner(spec, target.arena, region, target.device)
        if runner.layout.num_pages != geometry.num_exl2_pages:
            raise ConfigError(f"the EXL2 runner of {plan.key!r} sees {runner.layout.num_pages} pages in its region, "
                              f"the region holds {geometry.num_exl2_pages}")
        tokenizer = load_tokenizer(spec.path)
        own = RegionPool(plan.key, region_owner(plan.key), region, geometry.charge_map(),
                         geometry.bytes_per_exl2_page)
        return BuiltModel(spec, runner, tokenizer, runner.layout, eos_ids(spec.eos_token_ids, tokenizer),
                          spec.weight_bytes, region=own, note="exllamav2 (CUDA)")

    def release(self, built: BuiltModel) -> None:
        pass

    def check(self, device: torch.device) -> None:
        """exllamav2 importable and a CUDA device, or an error naming what is missing."""
        from .checkpoint import require_exllamav2

        require_exllamav2()
        if torch.device(device).type != "cuda":
            raise ConfigError(f"EXL2 models run on CUDA only; this workspace's device is {device} "
                              "(use Workspace(device='cuda'))")

    def runner(self, spec, arena, region: list[int], device):
        """The runner over the region's arena pages (a subclass may run another engine over the same region)."""
        from .runner import Exl2Runner

        return Exl2Runner(spec, arena, region, device=device)
