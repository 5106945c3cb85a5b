"""torchrun worker for test_fsdp: meta build → FSDP2 → materialise equals an unsharded init; EMA is sharded."""
import sys
import warnings

import torch
from torch.distributed.tensor import DTensor

from modeling import build_model
from trainer import dist
from trainer.config import StrategyConfig
from trainer.ema import EMA
from trainer.parallel.fsdp import FSDPStrategy

OVR = dict(in_channels=1, num_classes=10, hidden_size=32, depth=2, groups=4)


def optimizer_paths_agree(precision: str) -> None:
    """The optimizer step on the local shards (FSDPStrategy._local_adam_step) equals torch's AdamW step through the
    DTensors bitwise, for the single-tensor and the fused implementation, weight decay on, an unevenly sharded
    parameter included (the label table has 11 rows on 2 ranks)."""
    for fused in (None, True):
        runs = []
        for local in (True, False):
            torch.manual_seed(5)
            s = FSDPStrategy(StrategyConfig(name="fsdp", blocks_per_unit=1), precision=precision)
            s.setup(lambda device: build_model("FlowDCN-debug", device=device, **OVR),
                    lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, fused=fused))
            if not local:
                s._local_adam = False   # torch's own step through the DTensors
            g = torch.Generator().manual_seed(7)
            for _ in range(3):
                with s.autocast():
                    x, t = torch.randn(2, 1, 8, 8, generator=g), torch.rand(2, generator=g)
                    out = s.model(x.to(dist.device()), t.to(dist.device()), torch.tensor([0, 3], device=dist.device()))
                out.float().square().mean().backward()
                s.step(1e-2)
            assert s._local_adam is local, (fused, local, s._local_adam)   # the local path really ran (steps 2, 3)
            state = {f"param.{k}": v.full_tensor() for k, v in s.module.named_parameters()}
            for k, p in s.module.named_parameters():
                st = s.optimizer.state[p]
                state[f"m.{k}"], state[f"v.{k}"] = st["exp_avg"].full_tensor(), st["exp_avg_sq"].full_tensor()
                state[f"step.{k}"] = st["step"]
            runs.append(state)
            s.close()
        a, b = runs
        assert sorted(a) == sorted(b)
        for k in a:
            assert torch.equal(a[k], b[k]), f"fused={fused}: {k} differs between the local-shard and the DTensor step"
        assert float(a["step.final_layer.linear.weight"]) == 3.0


def main() -> None:
    dist.init(require=True)
    torch.manual_seed(5)
    ref = build_model("FlowDCN-debug", device="cpu", **OVR)
    torch.manual_seed(5)
    s = FSDPStrategy(StrategyConfig(name="fsdp", blocks_per_unit=1, reshard_after_forward=True), precision=sys.argv[1],
                     activation_checkpointing=True)
    s.setup(lambda device: build_model("FlowDCN-debug", device=device, **OVR),
            lambda params: torch.optim.AdamW(params, lr=1e-3))
    full = s.full_model_state_dict()
    # Buffers are replicated: the MSDCN prior grid must be the real one on every rank, not to_empty's garbage.
    for name, buf in s.module.named_buffers():
        assert torch.equal(buf.cpu(), dict(ref.named_buffers())[name]), name
    ema = EMA(s.ema_params())
    big = [k for k, v in ema.shadow.items() if v.numel() >= 2 * dist.get_world_size()]
    assert big and all(isinstance(ema.shadow[k], DTensor) for k in big)
    local = sum(v.to_local().numel() for v in ema.shadow.values())
    total = sum(v.numel() for v in ema.shadow.values())
    assert local < 0.75 * total, (local, total)   # a shard per rank, no full replica
    ema_full = s.full_state_dict(ema.shadow)
    resharded = s.shard_like_params(ref.state_dict())
    back = s.full_state_dict(resharded)
    if dist.get_rank() == 0:
        sd = ref.state_dict()
        assert sorted(full) == sorted(sd)
        for k in sd:
            assert torch.equal(full[k], sd[k]), k
            if k in ema_full:
                assert torch.equal(ema_full[k], sd[k].float()), k
                assert torch.equal(back[k], sd[k].float()), k
    # Between forward and backward: the first unit is resharded, the last unit and the final layer are not
    # (backward needs them first).
    with s.autocast(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dev = dist.device()   # CPU under gloo; the GPU test runs this worker on CUDA (CUDA MSDCN kernels, fused AdamW)
        out = s.model(torch.randn(2, 1, 8, 8, device=dev), torch.rand(2, device=dev), torch.tensor([0, 3], device=dev))
    views = [str(w.message) for w in caught if "returned a view" in str(w.message)]
    assert not views, views   # FSDP2's warning that an in-place op on a unit's output would drop its backward hook
    sharded = lambda m: [isinstance(p, DTensor) for p in m.parameters(recurse=False)]   # noqa: E731
    assert all(all(sharded(m)) for m in s.module.blocks[0].modules()), "first block not resharded after forward"
    assert not any(any(sharded(m)) for m in s.module.blocks[-1].modules()), "last block resharded after forward"
    assert not any(any(sharded(m)) for m in s.module.final_layer.modules())
    out.float().square().mean().backward()
    # The grad norm from local shards equals torch's over the DTensor gradients; clipping scales like torch's.
    grads = [p.grad for p in s.module.parameters() if p.grad is not None]
    ref = torch.nn.utils.get_total_norm(grads).full_tensor()
    before = [g.full_tensor() for g in grads]
    norm = s.clip_grad_norm(0.0)
    torch.testing.assert_close(norm, ref, rtol=1e-6, atol=0)
    assert all(torch.equal(g.full_tensor(), b) for g, b in zip(grads, before)), "measuring changed the gradients"
    s.clip_grad_norm(0.25 * float(ref))
    coef = 0.25 * float(ref) / (float(ref) + 1e-6)
    for g, b in zip(grads, before):
        torch.testing.assert_close(g.full_tensor(), b * coef, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(s.clip_grad_norm(0.0), 0.25 * ref, rtol=1e-5, atol=0)
    optimizer_paths_agree(sys.argv[1])
    if dist.get_rank() == 0:
        print("FSDP-INIT-OK", flush=True)
    dist.destroy()


if __name__ == "__main__":
    main()
