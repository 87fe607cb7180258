"""Pre-training configuration: recipes, command-line overrides, validation messages, optimiser groups, lr schedule,
and the launcher's process layout (torchrun / multi-node / SLURM), all without starting a run."""

from __future__ import annotations

import math

import pytest
import torch

from model import create_model
from tools.launch import PROTOCOLS, LaunchPlan, plan_launch, torchrun_args
from train.config import TrainConfig, config_from_args, help_text, parse_overrides
from train.distributed import expand_nodelist, rank_info
from train.optim import CosineSchedule, build_optimizer, param_groups
from train.recipes import RECIPES, recipe_values

BASE = ["--data", "d", "--out", "o"]


def cfg_of(*args: str) -> TrainConfig:
    return config_from_args([*BASE, *args])


def error_of(*args: str, base: list[str] = BASE) -> str:
    with pytest.raises(ValueError) as e:
        config_from_args([*base, *args])
    return str(e.value)


# ------------------------------------------------------------------------------------------------------------------
# Recipes


def test_paper_recipes():
    names = set(RECIPES)
    assert {f"supmae_vit_base_in1k_{e}ep" for e in (100, 200, 400)} <= names
    assert {f"mae_vit_base_in1k_{e}ep" for e in (100, 200, 400, 1600)} <= names
    assert {"supmae_vit_tiny_demo", "mae_vit_tiny_demo"} <= names

    s = cfg_of("--recipe", "supmae_vit_base_in1k_400ep")
    m = s.model_config(num_classes=1000)
    assert (s.epochs, s.warmup_epochs, s.blr, s.weight_decay, s.betas, s.mask_ratio) == (400, 20, 1.5e-4, 0.05,
                                                                                          (0.9, 0.95), 0.75)
    assert (m.embed_dim, m.depth, m.num_heads, m.patch_size, m.img_size) == (768, 12, 12, 16, 224)
    assert (m.decoder_depth, m.decoder_embed_dim, m.decoder_num_heads) == (1, 512, 16)
    assert (m.cls_branch, m.global_pool, m.norm_pix_loss, m.cls_loss_ratio, m.temperature) == (True, True, True,
                                                                                               0.01, 10.0)
    # The released log's peak lr 2.4e-3 = 1.5e-4 x 4096 / 256: 512 per GPU on one 8-GPU node.
    assert s.effective_batch(8) == 4096 and math.isclose(s.peak_lr(8), 2.4e-3)

    mae = cfg_of("--recipe", "mae_vit_base_in1k_1600ep")
    mm = mae.model_config(num_classes=1000)
    assert (mae.epochs, mae.warmup_epochs, mae.blr) == (1600, 40, 1.5e-4)
    assert (mm.decoder_depth, mm.decoder_embed_dim, mm.cls_branch, mm.norm_pix_loss) == (8, 512, False, True)
    for e in (100, 200, 400):
        assert cfg_of("--recipe", f"supmae_vit_base_in1k_{e}ep").epochs == e
        assert cfg_of("--recipe", f"mae_vit_base_in1k_{e}ep").warmup_epochs == 40

    demo = cfg_of("--recipe", "supmae_vit_tiny_demo").model_config(num_classes=10)
    assert (demo.img_size, demo.patch_size, demo.decoder_depth, demo.num_classes) == (32, 4, 1, 10)
    assert cfg_of("--recipe", "mae_vit_tiny_demo").model_config().decoder_depth == 8


def test_recipes_state_their_batch_and_where_their_warm_up_comes_from():
    from pathlib import Path

    from train.recipes import batch_warning

    table = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    for name, r in RECIPES.items():
        assert r.effective_batch == (4096 if "in1k" in name else 128), name
        official = name in ("supmae_vit_base_in1k_400ep", "mae_vit_base_in1k_1600ep")
        assert r.warmup_source.startswith("official: " if official else "this project's choice"), name
        if official:
            assert "PRETRAIN.md line" in r.warmup_source
        assert r.warmup_source in table, f"docs/training.md lacks the warm-up source of {name}"
    assert RECIPES["supmae_vit_tiny_demo"].eval_recipe == "small" and not RECIPES["mae_vit_base_in1k_400ep"].eval_recipe
    # far below the recipe's batch: a warning that says what to change
    r = RECIPES["supmae_vit_base_in1k_400ep"]
    assert batch_warning("x", r, 512, 1, 8, 2.4e-3) is None and batch_warning("x", r, 128, 1, 8, 6e-4) is None
    w = batch_warning("supmae_vit_base_in1k_400ep", r, 64, 1, 2, 7.5e-5)
    assert w.startswith("warning: effective batch 128 (64 x 1 accum x 2 processes) is 32x below the 4096 the "
                        "recipe supmae_vit_base_in1k_400ep is tuned for")
    assert "use --batch-size 2048 on 2 process(es) or --accum-steps 32" in w and "*_demo recipe" in w


def test_recipe_values_are_copies():
    recipe_values("supmae_vit_tiny_demo")["model_args"]["depth"] = 99
    assert recipe_values("supmae_vit_tiny_demo")["model_args"]["depth"] == 6


# ------------------------------------------------------------------------------------------------------------------
# Overrides


def test_overrides_of_train_and_model_fields():
    c = cfg_of("--recipe", "supmae_vit_tiny_demo", "--model", "supmae_vit_tiny_patch16", "--img-size", "32",
               "--patch-size", "4", "--num-classes", "10", "--epochs", "1", "--warmup-epochs", "1",
               "--batch-size", "64", "--log-every", "1", "--ckpt-every", "10", "--max-steps", "20", "--seed", "0",
               "--betas=0.9,0.999", "--lr", "none", "--no-compile", "--sync-bn", "--no-tensorboard",
               "--fused-masking", "off", "--depth", "2")
    assert (c.epochs, c.batch_size, c.max_steps, c.betas, c.lr, c.compile, c.sync_bn, c.tensorboard) == (
        1, 64, 20, (0.9, 0.999), None, "off", True, False)
    assert c.model_args["patch_size"] == 4 and c.model_args["depth"] == 2 and c.model_args["fused_masking"] == "off"
    # a recipe's model_args survive unless overridden
    assert c.model_args["embed_dim"] == 192
    mc = c.model_config(num_classes=3)
    assert (mc.num_classes, mc.depth, mc.img_size) == (10, 2, 32)  # --num-classes beats the data set's count
    assert cfg_of("--recipe", "supmae_vit_tiny_demo").model_config(num_classes=3).num_classes == 3
    assert parse_overrides(["--clip-grad", "1", "--min-lr=-0"]) == {"clip_grad": 1.0, "min_lr": -0.0}
    assert parse_overrides(["--no-fused-masking"]) == {"model_args": {"fused_masking": "off"}}
    assert parse_overrides(["--epochs", "3", "--depth", "2", "--epochs", "4"]) == {"epochs": 4,
                                                                                   "model_args": {"depth": 2}}


@pytest.mark.parametrize("args, message", [
    (["--bach-size", "8"], "unknown option --bach-size; did you mean --batch-size, --patch-size, --eval-batch-size? "
                           "(see --help for the list)"),
    (["--batch-size", "0"], "--batch-size 0 is invalid: must be an integer >= 1"),
    (["--batch-size", "many"], "--batch-size many is invalid: must be an integer"),
    (["--epochs", "10", "--warmup-epochs", "20"], "--warmup-epochs 20.0 is invalid: must be a number in [0, epochs=10]"),
    (["--precision", "fp8"], "--precision fp8 is invalid: must be one of auto, bf16, fp16, fp32"),
    (["--mask-ratio", "1.0"], "--mask-ratio 1.0 is invalid: must be a number in (0, 1)"),
    # nothing masked: the loss (a mean over the masked patches) would be 0 / 0 at every step
    (["--mask-ratio", "0"], "--mask-ratio 0.0 is invalid: must be a number in (0, 1)"),
    (["--mask-ratio", "1e-17"], "--mask-ratio 1e-17 masks no patch of 196 (the loss is computed on the masked "
                                "ones); raise it"),
    (["--betas", "0.9"], "--betas 0.9 is invalid: must be 2 comma-separated numbers"),
    (["--betas", "0.9,1.5"], "--betas 0.9,1.5 is invalid: must be two numbers in [0, 1), e.g. 0.9,0.95"),
    (["--blr", "nan"], "--blr nan is invalid: must be a number"),
    (["--lr", "1e-3", "--min-lr", "1"], "--min-lr 1.0 is invalid: must be a number in [0, --lr 0.001] (the cosine "
                                         "ends there)"),
    (["--compile", "maybe"], "--compile maybe is invalid: must be one of auto, on, off"),
    (["--eval-every", "1"], "--eval-every 1 needs --eval-data (a held-out shard folder)"),
    (["--recipe", "supmae_vit_base_in1k_300ep"],
     "unknown recipe 'supmae_vit_base_in1k_300ep'; did you mean supmae_vit_base_in1k_400ep, "
     "supmae_vit_base_in1k_200ep, supmae_vit_base_in1k_100ep? (available: " + ", ".join(RECIPES) + ")"),
    (["--img-size", "30", "--patch-size", "4"], "model config: img_size 30 is not a multiple of patch_size 4"),
    (["--model", "vit_base"], "unknown model 'vit_base'; available: "),
    (["--epochs"], "--epochs needs a value (an integer)"),
    (["--no-epochs"], "--no-epochs is not an option: --epochs is not an on/off switch"),
    (["epochs", "3"], "unexpected argument 'epochs' after --out o, which takes one value: options are --field-name "
                      "value"),
    (["--model", "mae_vit_base_patch16", "--eval-every", "1", "--eval-data", "v"],
     "--eval-every needs a model with the classification branch; mae_vit_base_patch16 has none"),
])
def test_validation_messages(args, message):
    assert error_of(*args).startswith(message)


def test_required_fields():
    assert error_of("--epochs", "1", base=["--out", "o"]) == "--data is required (got none)"
    assert error_of(base=["--data", "d"]) == "--out is required (got none)"


def test_config_round_trip_and_differences():
    c = cfg_of("--recipe", "supmae_vit_tiny_demo", "--epochs", "3")
    d = c.to_dict()
    assert d["betas"] == [0.9, 0.95]
    back = TrainConfig.from_dict(d)
    assert back == c
    other = cfg_of("--recipe", "supmae_vit_tiny_demo", "--epochs", "4", "--log-every", "7")
    assert c.differences(other) == {"epochs": (3, 4)}  # log_every is a runtime field


def test_help_lists_recipes_and_options():
    text = help_text()
    for name in RECIPES:
        assert name in text
    for opt in ("--batch-size", "--resume", "--skip-nonfinite", "--keep-every", "--patch-size", "--nproc"):
        assert opt in text


# ------------------------------------------------------------------------------------------------------------------
# Optimiser groups and schedule


def official_add_weight_decay(model, weight_decay):
    """timm 0.3.2's `optim_factory.add_weight_decay(model, weight_decay, skip_list=())`, which the official MAE /
    SupMAE pre-training calls (main_pretrain.py line 179, main_pretrain_supmae.py line 192), re-typed here."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if len(param.shape) == 1 or name.endswith(".bias") or name in ():
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


@pytest.mark.parametrize("family", ["supmae", "mae"])
def test_weight_decay_groups_are_the_official_pretraining_groups(family):
    model = create_model(f"{family}_vit_tiny_patch16", img_size=16, patch_size=4, embed_dim=32, depth=1,
                         num_heads=2, decoder_embed_dim=32, decoder_num_heads=2, cls_hidden=16, num_classes=3)
    groups = param_groups(model, 0.05)
    official = official_add_weight_decay(model, 0.05)
    assert [g["weight_decay"] for g in groups] == [g["weight_decay"] for g in official] == [0.0, 0.05]
    for ours, theirs in zip(groups, official, strict=True):
        assert [id(p) for p in ours["params"]] == [id(p) for p in theirs["params"]]  # same tensors, same order
    no_decay, decay = groups
    # The tokens are (1, 1, D), not 1-D: decayed, as in the official runs. The sin-cos tables are not trained.
    assert {"cls_token", "mask_token", "patch_embed.proj.weight", "decoder_pred.weight"} <= set(decay["names"])
    assert {"patch_embed.proj.bias", "blocks.0.norm1.weight", "norm.bias", "decoder_pred.bias"} <= set(
        no_decay["names"])
    if family == "supmae":
        assert {"cls_head.0.weight", "cls_head.3.weight"} <= set(decay["names"])
        assert {"cls_head.1.weight", "cls_head.1.bias"} <= set(no_decay["names"])
    assert not {"pos_embed", "decoder_pos_embed"} & set(decay["names"] + no_decay["names"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(decay["names"]) | set(no_decay["names"]) == trainable
    opt = build_optimizer(model, 1e-3, 0.05, (0.9, 0.95))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.05]
    assert [len(g["params"]) for g in opt.param_groups] == [len(g["params"]) for g in official]
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["fused"] is True


def test_cosine_schedule_values():
    s = CosineSchedule(peak_lr=1e-3, min_lr=1e-5, warmup_steps=10, total_steps=110)
    assert s(0) == 0.0
    assert s(5) == pytest.approx(5e-4)
    assert s(10) == pytest.approx(1e-3)  # peak right after warm-up
    assert s(60) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)  # half-way down the cosine
    assert s(109) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 99 / 100)))
    assert s(110) == pytest.approx(1e-5)
    assert CosineSchedule(1.0, 0.0, 0, 4)(0) == 1.0
    with pytest.raises(ValueError, match="warmup_steps"):
        CosineSchedule(1.0, 0.0, 5, 4)


def test_fused_adamw_skips_a_step_on_the_device():
    """The non-finite skip relies on fused AdamW's found_inf: weights, moments and step count stay put."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1, fused=True)
    p.grad = torch.ones(3)
    opt.step()
    before = (p.detach().clone(), opt.state[p]["exp_avg"].clone(), opt.state[p]["step"].clone())
    p.grad = torch.full((3,), float("nan"))
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    assert torch.equal(p.detach(), before[0]) and torch.equal(opt.state[p]["exp_avg"], before[1])
    assert torch.equal(opt.state[p]["step"], before[2])


# ------------------------------------------------------------------------------------------------------------------
# Launcher layout


def test_nodelist_expansion():
    assert expand_nodelist("gpu[01-03,07],cpu5") == ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]
    assert expand_nodelist("node7") == ["node7"]
    assert expand_nodelist("a[9-11]") == ["a9", "a10", "a11"]


def test_launch_plans():
    assert plan_launch({}, visible_gpus=0) == LaunchPlan("direct", 1, 1, 0, "127.0.0.1", None, "local")
    assert plan_launch({}, visible_gpus=8).mode == "torchrun"
    assert plan_launch({}, visible_gpus=8, nproc=1).mode == "direct"
    p = plan_launch({"NNODES": "4", "NODE_RANK": "2", "MASTER_ADDR": "n0", "MASTER_PORT": "1234"}, visible_gpus=8)
    assert p == LaunchPlan("torchrun", 8, 4, 2, "n0", 1234, "env") and p.world_size == 32
    with pytest.raises(ValueError, match="NNODES > 1 needs MASTER_ADDR"):
        plan_launch({"NNODES": "2"}, visible_gpus=8)
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_NNODES": "2", "SLURM_STEP_NUM_NODES": "2",
             "SLURM_STEP_NUM_TASKS": "2", "SLURM_NODEID": "1", "SLURM_STEP_NODELIST": "gpu[07-08]"}
    assert plan_launch(slurm, visible_gpus=8) == LaunchPlan("torchrun", 8, 2, 1, "gpu07", 24242, "slurm")
    per_gpu = dict(slurm, SLURM_STEP_NUM_TASKS="16")
    assert plan_launch(per_gpu, visible_gpus=8).mode == "direct"
    with pytest.raises(ValueError, match="outside srun"):
        plan_launch({"SLURM_JOB_ID": "1", "SLURM_NNODES": "2"}, visible_gpus=8)
    args = torchrun_args(p, "train.pretrain", ["--epochs", "1"])
    assert args[-4:] == ["-m", "train.pretrain", "--epochs", "1"]
    assert "--nnodes=4" in args and "--node-rank=2" in args and "--master-addr=n0" in args
    assert "--standalone" in torchrun_args(plan_launch({}, 8), "m", [])
    assert PROTOCOLS["pretrain"].module == "train.pretrain"


def test_rank_info_from_torchrun_and_srun():
    assert rank_info({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "MASTER_ADDR": "h", "MASTER_PORT": "9"}) \
        .rank == 3
    srun = {"SLURM_PROCID": "9", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "1",
            "SLURM_STEP_TASKS_PER_NODE": "8(x2)", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "4242"}
    info = rank_info(srun)
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size, info.master_addr,
            info.master_port) == (9, 16, 1, 8, "gpu07", 24242)
    assert rank_info({}).world_size == 1
    # the batch script (no step variables) is one process even in a 16-task allocation
    assert rank_info({"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_JOB_ID": "4242"}).world_size == 1
