"""Evaluation building blocks, in-process and tiny: top-k counting, the k-NN vote, layer-wise lr decay, mixup
targets, RandAugment in both loaders, the encoder from every checkpoint kind, configuration errors."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch

from model import create_model
from pipeline.loaders.base import LoaderConfig
from pipeline.loaders.build import build_loader
from tests.conftest import write_tiny_shards
from train.eval.accuracy import TopKCounter, topk_hits
from train.eval.encoder import PretrainedSource, ViTEncoder, build_vit, resolve_source
from train.eval.knn import knn_classify

TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
            decoder_num_heads=2, cls_hidden=32, num_classes=3)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_source(seed: int = 0, **kw) -> PretrainedSource:
    return resolve_source("random", "supmae_vit_tiny_patch16", {**TINY, **kw}, seed=seed)


# ------------------------------------------------------------------------------------------------------------------
# Top-k counting


def test_topk_hits_equal_a_hand_count_and_skip_padding():
    scores = torch.tensor([
        [0.1, 0.5, 0.2, 0.0, 0.9, 0.3],  # ranking 4 1 5 2 0 3
        [0.8, 0.1, 0.0, 0.3, 0.2, 0.4],  # ranking 0 5 3 4 1 2
        [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],  # ranking 5 4 3 2 1 0
        [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],  # ranking 0 1 2 3 4 5
        [0.3, 0.3, 0.9, 0.1, 0.0, 0.2],  # padding
    ])
    labels = torch.tensor([4, 3, 0, 5, 2])
    # by hand: row 0 label 4 is 1st (top-1, top-5); row 1 label 3 is 3rd (top-5); row 2 label 0 is 6th (none);
    # row 3 label 5 is 6th (none); row 4 would be a top-1 hit but is padding
    valid = torch.tensor([True, True, True, True, False])
    assert topk_hits(scores, labels, (1, 5), valid).tolist() == [1, 2]
    assert topk_hits(scores, labels, (1, 2, 3, 6)).tolist() == [2, 2, 3, 5]
    counter = TopKCounter((1, 5))
    counter.update(scores[:2], labels[:2])
    counter.update(scores[2:], labels[2:], valid[2:], num_valid=2)
    assert counter.result() == {"top1": 1 / 4, "top5": 2 / 4, "samples": 4}
    # fewer classes than k: every sample is a top-k hit (top-1 by hand: only row 0 ranks class 1 first)
    assert topk_hits(scores[:, :3], torch.ones(5, dtype=torch.int64), (1, 5)).tolist() == [1, 5]


def test_topk_counter_sums_the_loss_of_real_samples_only():
    counter = TopKCounter((1,), with_loss=True)
    counter.update(torch.eye(3), torch.tensor([0, 1, 0]), torch.tensor([True, True, False]), 2,
                   losses=torch.tensor([1.0, 3.0, 100.0]))
    assert counter.result() == {"top1": 1.0, "samples": 2, "loss": 2.0}


# ------------------------------------------------------------------------------------------------------------------
# k-NN vote


def clustered(n_per_class: int, classes: int, dim: int, seed: int, spread: float = 0.3):
    """L2-normalised features around one random centre per class (the same centres for every seed), with noise
    drawn from `seed`, and their labels."""
    centres = torch.nn.functional.normalize(torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)),
                                            dim=1)
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    feats = centres[labels] + spread / math.sqrt(dim) * torch.randn(len(labels), dim, generator=g)
    return torch.nn.functional.normalize(feats, dim=1), labels


def test_knn_on_separable_features_is_perfect():
    bank, bank_labels = clustered(50, 10, 32, seed=0)
    queries, labels = clustered(20, 10, 32, seed=1)  # same centres, new noise
    votes = knn_classify(queries, bank, bank_labels, 10, k=20, temperature=0.07)
    assert votes.shape == (200, 10)
    assert topk_hits(votes, labels, (1, 5)).tolist() == [200, 200]


def test_knn_with_shuffled_labels_is_at_chance():
    bank, bank_labels = clustered(200, 10, 32, seed=0)
    queries, labels = clustered(200, 10, 32, seed=1)
    g = torch.Generator().manual_seed(2)
    # Labels shuffled on both sides carry no information: each query's vote is independent of its label.
    bank_labels = bank_labels[torch.randperm(len(bank_labels), generator=g)]
    labels = labels[torch.randperm(len(labels), generator=g)]
    votes = knn_classify(queries, bank, bank_labels, 10, k=20, temperature=0.07)
    top1 = topk_hits(votes, labels, (1,)).item() / len(labels)
    # Chance is 0.1; over 2000 independent queries the binomial std is 0.0067: 0.04 is a 6-sigma band.
    assert abs(top1 - 0.1) < 0.04, top1


def test_knn_votes_are_temperature_weighted():
    bank = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8]]), dim=1)
    query = torch.tensor([[1.0, 0.0]])
    votes = knn_classify(query, bank, torch.tensor([0, 1, 1]), 2, k=3, temperature=0.5)
    # similarities 1, 0.8, 0.6: class 0 gets e^2, class 1 e^1.6 + e^1.2 (> e^2: two weaker neighbours win)
    torch.testing.assert_close(votes, torch.tensor([[math.exp(2.0), math.exp(1.6) + math.exp(1.2)]]))
    assert knn_classify(query, bank, torch.tensor([0, 1, 1]), 2, k=1, temperature=0.5).argmax().item() == 0


# ------------------------------------------------------------------------------------------------------------------
# Layer-wise lr decay and the fine-tuning batch transforms


def finetune_task(tmp_path, *args: str):
    from train.eval.finetune import FinetuneConfig, FinetuneTask

    cfg = FinetuneConfig(data="d", eval_data="v", out=str(tmp_path), ckpt="random", model="supmae_vit_tiny_patch16",
                         batch_size=4, **dict(zip(args[::2], args[1::2], strict=True)))
    return FinetuneTask(cfg, tiny_source(), num_classes=5)


def test_layer_decay_groups_assign_maes_rates(tmp_path):
    task = finetune_task(tmp_path, "layer_decay", 0.5, "weight_decay", 0.05)
    opt = task.build_optimizer(1e-3)
    scale, decay = {}, {}
    names = {id(p): n for n, p in task.model.named_parameters()}
    for g in opt.param_groups:
        for p in g["params"]:
            scale[names[id(p)]], decay[names[id(p)]] = g["lr_scale"], g["weight_decay"]
    assert set(scale) == set(names.values())  # every parameter is trained
    depth = 3  # layer ids: patch embed / cls / pos 0, block i -> i + 1, head and fc_norm depth + 1 = 4
    for name in ("patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "pos_embed"):
        assert scale[name] == 0.5 ** (depth + 1), name
    for i in range(depth):
        assert {scale[n] for n in scale if n.startswith(f"blocks.{i}.")} == {0.5 ** (depth - i)}
    for name in ("head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"):
        assert scale[name] == 1.0, name
    assert {n for n, d in decay.items() if d == 0.05} == {
        "patch_embed.proj.weight", "head.weight",
        *(f"blocks.{i}.{m}.weight" for i in range(depth) for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"))}
    # The trainer applies the scale to the schedule's lr.
    from train.trainer import Trainer

    trainer = Trainer.__new__(Trainer)
    trainer.optimizer = opt
    trainer._set_lr(2e-3)
    assert sorted({g["lr"] for g in opt.param_groups}) == pytest.approx([2e-3 * 0.5**k for k in (4, 3, 2, 1, 0)])


def test_mixup_targets_sum_to_one_and_images_mix(tmp_path):
    task = finetune_task(tmp_path, "mixup", 0.8, "cutmix", 1.0, "smoothing", 0.1)
    np.random.seed(0)
    for _ in range(6):  # mixup and cutmix both come up (switch_prob 0.5)
        x = torch.randn(4, 3, 16, 16)
        mixed, target = task.mixup(x.clone(), torch.tensor([0, 1, 2, 3]))
        assert target.shape == (4, 5)
        torch.testing.assert_close(target.sum(dim=1), torch.ones(4))
        assert (target > 0).sum(dim=1).min() >= 2  # two classes mixed, smoothing spreads the rest
        assert not torch.equal(mixed, x)


def test_random_erasing_and_normalisation_on_the_device_batch(tmp_path):
    from train.distributed import DistEnv

    task = finetune_task(tmp_path, "reprob", 1.0)
    task.setup(DistEnv(), sync_bn=False)
    images = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8)
    x = task.model.normalize(images)
    assert x.shape == (4, 3, 16, 16) and x.is_contiguous(memory_format=torch.channels_last)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(x, ((images.float() / 255 - mean) / std).permute(0, 3, 1, 2))
    erased = task.erasing(x.clone())
    changed = (erased != x).flatten(1).any(dim=1)
    assert changed.all()  # probability 1: every image has an erased rectangle
    assert ((erased != x).float().mean() < 0.5).item()


# ------------------------------------------------------------------------------------------------------------------
# RandAugment in the loaders


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_randaugment_runs_in_the_pipeline_changes_pixels_deterministically(tmp_path, backend):
    folder = tmp_path / "shards"
    write_tiny_shards(folder, num_samples=16, num_classes=4, per_shard=8, size=(24, 28))

    def images(**kw) -> torch.Tensor:
        cfg = LoaderConfig(str(folder), 8, 16, backend=backend, device="cpu", num_threads=1, shuffle_buffer=4, **kw)
        loader = build_loader(cfg)
        out = torch.cat([b.images.clone() for b in loader])
        if hasattr(loader, "close"):
            loader.close()
        return out

    plain = images()
    augmented = images(augment="finetune", randaug_n=2, randaug_m=9)
    assert augmented.shape == plain.shape == (16, 16, 16, 3) and augmented.dtype == torch.uint8
    assert torch.equal(images(augment="finetune", randaug_n=2, randaug_m=9), augmented)  # same seed, same pixels
    assert (augmented != plain).float().mean() > 0.5
    assert not torch.equal(images(augment="finetune", randaug_n=2, randaug_m=9, seed=1), augmented)
    # n = 0 is the pre-training pipeline, bit for bit
    assert torch.equal(images(augment="finetune", randaug_n=0), plain)


def test_loader_augment_option_validation_and_fingerprint():
    with pytest.raises(ValueError, match=r"LoaderConfig.augment='mixup' is invalid: one of \('pretrain', 'finetune'\)"):
        LoaderConfig("d", 4, augment="mixup")
    with pytest.raises(ValueError, match=r"randaug_m=11 is invalid: an int in \[0, 10\]"):
        LoaderConfig("d", 4, augment="finetune", randaug_m=11)
    # positions saved before the option existed still fit a pre-training loader
    assert "augment" not in LoaderConfig("d", 4).result_fingerprint()
    assert LoaderConfig("d", 4, augment="finetune").result_fingerprint()["randaug_m"] == 9


# ------------------------------------------------------------------------------------------------------------------
# Encoders from every kind of checkpoint


def test_encoder_from_original_pth_encoder_only_pth_and_random(tmp_path):
    model = create_model("supmae_vit_tiny_patch16", **TINY)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    full = tmp_path / "supmae_release.pth"
    torch.save({"model": state, "args": argparse.Namespace(lr=1e-3)}, full)  # as the official releases store it
    encoder_only = tmp_path / "mae_finetune_release.pth"
    torch.save({"model": {k: v for k, v in model.state_dict().items() if not k.startswith(("decoder", "mask_token",
                                                                                              "cls_head"))}},
               encoder_only)
    images = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8)
    ids = torch.arange(16).expand(2, -1)
    reference = model.eval().forward_encoder(model.as_nhwc(images), ids)[:, 1:].mean(dim=1)  # SupMAE's pooled feature
    for path in (full, encoder_only):
        source = resolve_source(path, model_args={"num_heads": 2})  # 32-d: the 64-d-head guess would say 1
        assert (source.kind, source.step, source.compute) == ("pth", None, None)
        vit = build_vit(source, 0, "avg", fc_norm=False).eval()
        assert isinstance(vit, ViTEncoder)
        torch.testing.assert_close(vit.features(images), reference, rtol=1e-5, atol=1e-5)
    # random: MAE's initialisation from the seed, zero compute
    a, b = tiny_source(seed=3), tiny_source(seed=3)
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state) and a.compute["flops"] == 0
    assert not torch.equal(a.state["blocks.0.attn.qkv.weight"], tiny_source(seed=4).state["blocks.0.attn.qkv.weight"])
    # a larger resolution resamples the position embedding
    assert build_vit(a, 7, "token", img_size=24).pos_embed.shape == (1, 1 + 36, 32)
    with pytest.raises(ValueError, match="neither a checkpoint of this project"):
        (tmp_path / "junk.pt").write_bytes(b"junk")
        resolve_source(tmp_path / "junk.pt")


def test_finetuning_fc_norm_starts_fresh_as_officially_or_from_the_pretrained_norm(tmp_path):
    source = tiny_source(seed=5)
    # a trained final norm, so that copying it is visible
    source.state["norm.weight"].uniform_(0.5, 1.5)
    source.state["norm.bias"].uniform_(-0.5, 0.5)
    task = finetune_task(tmp_path)  # the defaults: models_vit.py's new fc_norm, the pre-trained norm dropped
    assert task.cfg.fc_norm_init == "fresh"
    fresh = build_vit(source, 5, "avg")
    assert torch.equal(fresh.fc_norm.weight, torch.ones(32)) and torch.equal(fresh.fc_norm.bias, torch.zeros(32))
    assert isinstance(fresh.norm, torch.nn.Identity)  # timm's fc_norm model has no per-token norm
    copied = build_vit(source, 5, "avg", fc_norm_init="pretrained")
    assert torch.equal(copied.fc_norm.weight, source.state["norm.weight"])
    assert torch.equal(copied.fc_norm.bias, source.state["norm.bias"])
    for vit in (fresh, copied):  # every other encoder tensor is the pre-trained one
        assert torch.equal(vit.blocks[2].mlp.fc2.weight, source.state["blocks.2.mlp.fc2.weight"])
    token = build_vit(source, 5, "token")  # the cls-token head keeps the pre-trained per-token norm
    assert torch.equal(token.norm.weight, source.state["norm.weight"])
    with pytest.raises(ValueError, match="--fc-norm-init copy is invalid: must be one of fresh, pretrained"):
        finetune_task(tmp_path, "fc_norm_init", "copy")


def test_protocol_recipes_linear_probe_batches_and_defaults(tmp_path):
    """SupMAE's released probe (8192) and MAE's (16384) are named recipes; one default serves both methods and the
    configuration classes' defaults are that recipe, so the two cannot drift apart."""
    from train.eval.finetune import FinetuneConfig
    from train.eval.linprobe import PROTOCOL, LinprobeConfig
    from train.recipes import DEFAULT_PROTOCOL_RECIPES, PROTOCOL_RECIPES

    assert DEFAULT_PROTOCOL_RECIPES == {"linprobe": "mae_in1k", "finetune": "supmae_in1k"}
    probe = PROTOCOL_RECIPES["linprobe"]
    for name, per_gpu, accum, batch in (("mae_in1k", 2048, 1, 16384), ("supmae_in1k", 512, 2, 8192)):
        v = probe[name].values
        assert (v["batch_size"], v["accum_steps"], v["batch_size"] * v["accum_steps"] * 8) == (per_gpu, accum, batch)
        assert (v["blr"], v["lr"], v["epochs"], v["warmup_epochs"], v["weight_decay"]) == (0.1, None, 90, 10.0, 0.0)
        assert probe[name].effective_batch == batch
    for cls, protocol in ((LinprobeConfig, "linprobe"), (FinetuneConfig, "finetune")):
        default = cls(data="d", eval_data="v", ckpt="x.pth")
        for key, value in PROTOCOL_RECIPES[protocol][DEFAULT_PROTOCOL_RECIPES[protocol]].values.items():
            assert getattr(default, key) == value, (protocol, key)
    assert PROTOCOL_RECIPES["finetune"]["mae_in1k"].values["blr"] == 5e-4
    (tmp_path / "d").mkdir()
    base = ["--data", "d", "--eval-data", "v", "--ckpt", "x.pth"]
    from train.config import parse_overrides
    from train.recipes import protocol_values

    cfg = LinprobeConfig(**protocol_values("linprobe", parse_overrides([*base, "--recipe", "supmae_in1k",
                                                                        "--epochs", "50"], LinprobeConfig)))
    assert (cfg.recipe, cfg.batch_size, cfg.accum_steps, cfg.blr, cfg.epochs) == ("supmae_in1k", 512, 2, 0.1, 50)
    assert cfg.effective_batch(8) == 8192 and cfg.peak_lr(8) == pytest.approx(3.2)
    with pytest.raises(ValueError, match="unknown linprobe recipe 'supmae'; did you mean supmae_in1k"):
        protocol_values("linprobe", {"recipe": "supmae"})
    assert "supmae_in1k" in PROTOCOL.help_text() and "mae_in1k    *" in PROTOCOL.help_text()
    from pathlib import Path

    docs = (Path(__file__).resolve().parents[1] / "docs" / "evaluation.md").read_text()
    assert "| linprobe | `mae_in1k` (**default**) |" in docs and "| linprobe | `supmae_in1k` |" in docs


def test_comparison_probes_demo_checkpoints_with_the_small_recipes(tmp_path, monkeypatch):
    """bench compute / the demo evaluate the demo recipes' checkpoints with the protocols' small recipes (the
    ImageNet ones do not learn at that scale), unless the protocol options name a recipe."""
    import train.eval.linprobe as linprobe
    from train.compare.runner import ComparisonConfig, _Evaluator

    seen = []

    def check(argv):
        seen.append(argv)
        raise KeyboardInterrupt

    monkeypatch.setattr(linprobe, "check", check)
    for recipe, args, want in (("supmae_vit_tiny_demo", (), "small"), ("mae_vit_base_in1k_400ep", (), None),
                               ("mae_vit_tiny_demo", ("--recipe", "supmae_in1k"), "supmae_in1k")):
        cfg = ComparisonConfig(data="d", eval_data="v", out=str(tmp_path), budgets=(1.0,), protocols=("linprobe",),
                               protocol_args={"linprobe": args})
        with pytest.raises(KeyboardInterrupt):
            _Evaluator(cfg, None).supervised("linprobe", tmp_path / "step.pt", recipe)
        argv = seen[-1]
        recipes = [argv[i + 1] for i, a in enumerate(argv) if a == "--recipe"]
        assert recipes == ([want] if want else []), (recipe, argv)


@pytest.mark.parametrize("module, args, message", [
    ("finetune", ["--data", "d", "--eval-data", "v"], "--ckpt is required"),
    ("finetune", ["--data", "d", "--eval-data", "v", "--ckpt", "random"], "--ckpt random needs --model"),
    ("finetune", ["--data", "d", "--ckpt", "x.pth"], "--eval-data is required"),
    ("finetune", ["--data", "d", "--eval-data", "v", "--ckpt", "x.pth", "--model", "mae_vit_base_patch16"],
     "--model mae_vit_base_patch16 only applies to --ckpt random"),
    ("finetune", ["--data", "d", "--eval-data", "v", "--ckpt", "x.pth", "--mixup", "0.8", "--batch-size", "3"],
     "--batch-size 3 must be even with mixup / cutmix"),
    ("finetune", ["--data", "d", "--eval-data", "v", "--ckpt", "x.pth", "--global-pool", "max"],
     "--global-pool max is invalid: must be one of avg, token"),
    ("finetune", ["--data", "d", "--eval-data", "v", "--ckpt", "x.pth", "--layer-dcay", "0.7"],
     "unknown option --layer-dcay; did you mean --layer-decay"),
    ("linprobe", ["--data", "d", "--eval-data", "v", "--ckpt", "x.pth", "--feature", "mean"],
     "--feature mean is invalid: must be one of avg, token"),
    ("knn", ["--data", "d", "--eval-data", "v", "--ckpt", "x.pth", "--k", "0"], "--k 0 is invalid"),
    ("knn", ["--data", "d", "--eval-data", "v", "--ckpt", "random", "--model", "supmae_vit_tiny_patch16"],
     "--ckpt random needs --out"),
])
def test_protocol_options_are_validated(module, args, message):
    import importlib

    mod = importlib.import_module(f"train.eval.{module}")
    with pytest.raises(ValueError) as e:
        mod.check(args)
    assert str(e.value).startswith(message), str(e.value)


# ------------------------------------------------------------------------------------------------------------------
# Non-finite steps with LARS (no fused found_inf): undone on the device


def test_nonfinite_probe_step_is_undone_on_the_device(tmp_path):
    from pipeline.loaders.base import Batch
    from pipeline.loaders.memory_loader import InMemoryLoader
    from train.eval.linprobe import LinearProbeTask, LinprobeConfig
    from train.trainer import Trainer

    def loader(nan_batch: int | None) -> InMemoryLoader:
        def make(epoch: int, b: int) -> Batch:
            g = torch.Generator().manual_seed(10 * epoch + b)
            images = torch.randn(4, 3, 16, 16, generator=g)  # float NCHW: already normalised
            if b == nan_batch:
                images[0] = float("nan")
            return Batch(images, torch.randint(0, 3, (4,), generator=g), None, 4)
        return InMemoryLoader(make, 4, 16, 3)

    def trained(nan_batch: int | None, steps: int) -> Trainer:
        cfg = LinprobeConfig(data="d", eval_data="v", out=str(tmp_path / f"{nan_batch}-{steps}"), ckpt="random",
                             model="supmae_vit_tiny_patch16", batch_size=4, epochs=1, warmup_epochs=0.0, lr=0.1,
                             max_steps=steps, skip_nonfinite=1, log_every=10, display="off", tensorboard=False)
        torch.manual_seed(0)
        trainer = Trainer(cfg, LinearProbeTask(cfg, tiny_source(), 3), loader(nan_batch))
        trainer.train()
        return trainer

    clean, skipped = trained(None, 2), trained(2, 3)  # the third step's batch is NaN: it must change nothing
    assert skipped.compute.nonfinite_steps == 1 and skipped.step == 3
    for (name, a), b in zip(clean.model.state_dict().items(), skipped.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # head weights and BatchNorm statistics
    for p_clean, p_skipped in zip(clean.params, skipped.params, strict=True):
        assert torch.equal(clean.optimizer.state[p_clean]["momentum_buffer"],
                           skipped.optimizer.state[p_skipped]["momentum_buffer"])
