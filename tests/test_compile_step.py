"""torch.compile of the training step with the fused masking ops: one graph, no graph break, no recompilation.

The trainer compiles the model (`torch.compile(model)`; AOT autograd puts the backward in the same graph), so that
is what is compiled here, with fullgraph=True (any graph break raises) and the `aot_eager` backend; Dynamo's
counters give the number of graphs compiled (`unique_graphs`) and graph breaks. CPU: the fused kernels run under
the Triton interpreter; with CUDA the same test runs the compiled kernels.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from model import create_model

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TINY = dict(img_size=16, patch_size=4, num_classes=10, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32,
            decoder_depth=1, decoder_num_heads=2, cls_hidden=32, fused_masking="on")


@pytest.mark.slow  # two compilations of a tiny model: about 20 s on the 2-core build machine
def test_compiled_training_step_is_one_graph_without_recompilation():
    torch.manual_seed(0)
    model = create_model("supmae_vit_tiny_patch16", **TINY).to(DEV).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch._dynamo.reset()
    counters.clear()
    forward = torch.compile(model, backend="aot_eager", fullgraph=True)
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (3, 16, 16, 3), dtype=torch.uint8, generator=g).to(DEV)
    labels = torch.randint(0, 10, (3,), generator=g).to(DEV)

    def step(mask_ratio: float) -> torch.Tensor:
        out = forward(images, labels, mask_ratio=mask_ratio)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out.loss.detach()

    losses = [step(0.75) for _ in range(3)]
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])  # 3 steps, one compilation
    assert all(torch.isfinite(v) for v in losses)
    # A second mask ratio changes the number of kept patches: one recompilation (Dynamo may trace its sizes
    # symbolically; the launchers' checks must not turn them into text, which would break the graph), then none.
    for _ in range(2):
        step(0.5)
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
