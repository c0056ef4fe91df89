"""Stage 1: the device, and one tiny bf16 case through ``gist_loss`` against ``reference``
(forward, statistics, gradients) before anything large runs."""

from __future__ import annotations

import torch

from gpu_stages.common import Ctx, device_info, gist_function, harness, launch_log, seams


def run(ctx: Ctx) -> None:
    ctx.put("device", device_info(ctx.dev))
    H = harness()

    def tiny() -> dict:
        case = H.Case(b=48, k=1, d=64, d_g=48, margin=0.05, dtype=torch.bfloat16, device=ctx.dev)
        with launch_log() as launches:
            H.check_front_end("triton", case)
        plan = gist_function().pick_plan(torch.bfloat16, torch.device(ctx.dev))
        if hasattr(gist_function(), "_launch"):  # launches are logged through it
            assert launches, "no kernel launch recorded: the triton backend did not run"
        return {"plan": plan.name, **seams(launches, 4)}

    ctx.case("tiny bf16 front end", tiny)
