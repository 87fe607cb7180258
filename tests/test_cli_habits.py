"""Command-line habits: MAE / timm option names, timm's --aa string, --wandb without a value, SLURM node lists
(scontrol when present), bench errors as one line with exit 2, and --all-checkpoints of the evaluations."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import write_tiny_shards
from train.config import OPTION_ALIASES, config_from_args, parse_overrides, parse_timm_randaugment
from train.distributed import DistEnv, expand_nodelist
from train.eval.finetune import FinetuneConfig
from train.eval.knn import KnnConfig

ROOT = Path(__file__).resolve().parents[1]
ENC = ["--patch-size", "4", "--embed-dim", "32", "--depth", "1", "--num-heads", "2", "--decoder-embed-dim", "32",
       "--decoder-num-heads", "2", "--cls-hidden", "32"]
QUIET = ["--data-threads", "1", "--display", "off", "--no-tensorboard"]

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------------------------
# MAE / timm option names


def test_mae_and_timm_option_names_map_to_the_projects():
    cfg = config_from_args(["--data_path", "d", "--output_dir", "o", "--input_size", "32", "--accum_iter", "4",
                            "--nb_classes", "10", "--model", "mae_vit_base_patch16", "--patch-size", "4"])
    assert (cfg.data, cfg.out, cfg.img_size, cfg.accum_steps, cfg.model_args["num_classes"]) == ("d", "o", 32, 4, 10)
    assert config_from_args(["--data", "d", "--output", "o2"]).out == "o2"  # timm's --output
    ft = parse_overrides(["--finetune", "mae_pretrain_vit_base.pth", "--model-ema", "--model_ema_decay", "0.99",
                          "--aa", "rand-m9-mstd0.5-inc1"], FinetuneConfig)
    assert ft == {"ckpt": "mae_pretrain_vit_base.pth", "ema": True, "ema_decay": 0.99, "randaug_n": 2,
                  "randaug_m": 9, "randaug_mstd": 0.5, "randaug_inc": True}
    full = FinetuneConfig(data="d", eval_data="v", **ft)
    assert (full.randaug_n, full.randaug_m, full.randaug_mstd, full.randaug_inc) == (2, 9, 0.5, True)
    assert parse_overrides(["--finetune", "x.pth", "--output-dir", "o"], KnnConfig) == {"ckpt": "x.pth", "out": "o"}
    # an alias only exists where its target does
    with pytest.raises(ValueError, match="unknown option --finetune"):
        parse_overrides(["--finetune", "x.pth"])
    with pytest.raises(ValueError, match="unknown option --aa"):
        parse_overrides(["--aa", "rand-m9"])
    assert set(OPTION_ALIASES) >= {"data_path", "output_dir", "output", "input_size", "finetune", "model_ema"}


@pytest.mark.parametrize("args, message", [
    (["--log_dir", "x"], "unknown option --log-dir: TensorBoard events go to OUT/tb (--out); drop --log_dir"),
    (["--pin_mem"], "unknown option --pin-mem: batches bound for a GPU are pinned already; drop it"),
    (["--local_rank=0"], "unknown option --local-rank: ./launch.sh sets up the processes; drop it"),
    (["--dist_url", "env://"], "unknown option --dist-url: ./launch.sh sets up the processes (README \"Pre-train\"); "
                               "drop it"),
    (["--start_epoch", "5"], "unknown option --start-epoch: --resume auto continues at the checkpoint's step and data "
                             "position"),
])
def test_maes_options_without_a_counterpart_say_what_to_do_instead(args, message):
    """Not "did you mean --log-every?": MAE's main_pretrain.py options that this project does differently."""
    with pytest.raises(ValueError) as e:
        config_from_args(["--data", "d", "--out", "o", *args])
    assert str(e.value) == message
    assert config_from_args(["--data", "d", "--out", "o", "--num_workers", "3"]).data_threads == 3  # MAE's name


def test_a_name_and_its_alias_given_together_take_the_last_value_and_stray_values_are_named():
    """Two spellings of one field are the field given twice (the last value wins, as documented); a value an
    option does not take (timm's three-number --input-size) names the option it follows."""
    assert parse_overrides(["--output_dir", "a", "--out", "b"]) == {"out": "b"}
    assert parse_overrides(["--out", "b", "--output-dir", "a"]) == {"out": "a"}
    with pytest.raises(ValueError) as e:
        parse_overrides(["--data", "d", "--input-size", "3", "224", "224"])
    assert str(e.value) == ("unexpected argument '224' after --input-size 3, which takes one value (timm's "
                            "`--input-size 3 H W` is `--img-size H` here): options are --field-name value")
    with pytest.raises(ValueError, match="^unexpected argument 'x' after --no-compile, which takes no value: "):
        parse_overrides(["--no-compile", "x"])
    with pytest.raises(ValueError, match="^unexpected argument '4' after --epochs=3, which takes one value: "):
        parse_overrides(["--epochs=3", "4"])
    with pytest.raises(ValueError, match="^unexpected argument 'epochs': options are --field-name value$"):
        parse_overrides(["epochs", "3"])


def test_an_image_folder_given_as_data_says_to_shard_it(tmp_path, capsys):
    """MAE's --data_path is an ImageFolder root; here it is a shard folder. An image tree is told apart from an
    unfinished shard folder (whose own message says to re-run the shard command into it)."""
    from tools import launch

    images = tmp_path / "imagenet"
    (images / "train" / "n01440764").mkdir(parents=True)
    (images / "train" / "n01440764" / "a.JPEG").write_bytes(b"jpeg")
    unfinished = tmp_path / "shards"
    (unfinished / ".shard-state").mkdir(parents=True)
    (unfinished / "in1k-train-000000.tar").write_bytes(b"")
    code = launch.main(["pretrain", "--data_path", str(images), "--output_dir", str(tmp_path / "run"), "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and (f"pretrain: error: {images / 'manifest.json'} not found: {images} is not a shard folder: "
                          "it holds files or folders but no shards; if they are the images themselves (an ImageFolder tree, as MAE's --data_path "
                          "takes), shard them once with `./launch.sh shard IMAGES SHARDS` (README \"Shard ImageNet\": "
                          "one shard folder per split) and give the shard folder (--data SHARDS)\n") in err, err
    code = launch.main(["pretrain", "--data", str(unfinished), "--out", str(tmp_path / "run"), "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and f"{unfinished} is not a shard folder (or sharding did not finish); run `./launch.sh " \
                         f"shard SRC {unfinished}`" in err, err


@pytest.mark.parametrize("text, expected", [
    ("rand-m9-mstd0.5-inc1", {"randaug_n": 2, "randaug_m": 9, "randaug_mstd": 0.5, "randaug_inc": True}),
    ("rand-m7-n3", {"randaug_n": 3, "randaug_m": 7, "randaug_mstd": 0.0, "randaug_inc": False}),
    ("rand", {"randaug_n": 2, "randaug_m": 10, "randaug_mstd": 0.0, "randaug_inc": False}),  # timm's defaults
    ("none", {"randaug_n": 0}),
])
def test_timm_randaugment_strings(text, expected):
    assert parse_timm_randaugment(text) == expected


@pytest.mark.parametrize("text, message", [
    ("augmix-m5-w4", "only timm's RandAugment strings"),
    ("rand-m9-p0.3", "section 'p0.3' is not supported"),
    ("rand-mX", "section 'mX' needs a number after 'm'"),
    ("rand-mstd200", "mstd > 100 (uniform magnitude sampling) is not supported"),
])
def test_timm_randaugment_strings_refused(text, message):
    with pytest.raises(ValueError, match=f"--aa {text}"):
        parse_timm_randaugment(text)
    with pytest.raises(ValueError) as e:
        parse_timm_randaugment(text)
    assert message in str(e.value)


def test_out_of_range_randaugment_is_refused_by_the_config():
    with pytest.raises(ValueError, match=r"--randaug-m 11 is invalid: must be an integer in \[0, 10\]"):
        FinetuneConfig(data="d", eval_data="v", ckpt="x.pth", **parse_timm_randaugment("rand-m11"))


def test_wandb_option_takes_an_optional_project():
    assert parse_overrides(["--wandb", "--epochs", "3"]) == {"wandb": "supmae-fast", "epochs": 3}
    assert parse_overrides(["--wandb"]) == {"wandb": "supmae-fast"}
    assert parse_overrides(["--wandb", "my-proj"]) == {"wandb": "my-proj"}
    assert parse_overrides(["--wandb=x"]) == {"wandb": "x"}


# ------------------------------------------------------------------------------------------------------------------
# SLURM node lists


def test_nodelist_parser_expands_several_bracket_groups():
    assert expand_nodelist("rack[1-2]-gpu[01-02]", scontrol=False) == ["rack1-gpu01", "rack1-gpu02", "rack2-gpu01",
                                                                       "rack2-gpu02"]
    assert expand_nodelist("gpu[01-03,07],cpu5", scontrol=False) == ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]
    assert expand_nodelist("a[9-11],b[1,3]-x", scontrol=False) == ["a9", "a10", "a11", "b1-x", "b3-x"]
    assert expand_nodelist("", scontrol=False) == []
    with pytest.raises(ValueError, match="cannot read the range '3-1'"):
        expand_nodelist("n[3-1]", scontrol=False)


def fake_scontrol(folder: Path, body: str) -> None:
    script = folder / "scontrol"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)


def test_nodelist_uses_scontrol_when_present_and_falls_back(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    # scontrol is the reference: its answer wins (here a different one, to tell them apart); the list is one argument
    fake_scontrol(tmp_path, f'echo "$@" > {tmp_path}/args\necho fromslurm1; echo fromslurm2\n')
    assert expand_nodelist("gpu[01-02]") == ["fromslurm1", "fromslurm2"]
    assert (tmp_path / "args").read_text().split() == ["show", "hostnames", "gpu[01-02]"]
    assert expand_nodelist("gpu[01-02];rm -rf x") == ["fromslurm1", "fromslurm2"]  # no shell anywhere
    fake_scontrol(tmp_path, "exit 1\n")  # a broken scontrol: the built-in parser answers
    assert expand_nodelist("rack[1-2]-gpu1") == ["rack1-gpu1", "rack2-gpu1"]


# ------------------------------------------------------------------------------------------------------------------
# bench: errors as one line, exit 2


@pytest.mark.parametrize("args, message", [
    (["e2e", "--data", "/nonexistent/shards"], "bench e2e: error: shard folder /nonexistent/shards does not exist"),
    (["compute", "--runs", "/nonexistent/run"], "bench compute: error: run folder /nonexistent/run does not exist"),
    (["model", "--models", "nope"], "bench model: error: unknown model 'nope'"),
    (["memory", "--batch-sizes", "0"], "bench memory: error: --batch-sizes must be integers >= 1"),
    (["memory", "--repeats", "2"], "bench memory: error: --repeats does not apply: this benchmark times nothing"),
    (["model", "--repeats", "0"], "bench model: error: --repeats 0 is invalid: must be an integer >= 1"),
    (["kernels", "--warmup", "-1"], "bench kernels: error: --warmup -1 is invalid: must be an integer >= 0"),
    (["model", "--batch-size", "0", "--models", "mae_vit_tiny_patch16", "--img-size", "32", "--device", "cpu"],
     "bench model: error: step setup: batch_size must be a positive int, got 0"),  # not the default batch
    (["model", "--device", "gpu7"], "bench model: error: --device gpu7 is invalid: must be auto, cpu, cuda or cuda:N"),
    (["mixing", "--seed", "-1"], "bench mixing: error: --seed -1 is invalid: must be an integer >= 0"),
    (["mixing", "--samples", "10", "--world", "20"], "bench mixing: error: 10 samples cannot be split over 20 ranks"),
    (["shard", "--workers", "x"], "bench shard: error: --workers x: give comma-separated integers, e.g. 1,2"),
])
def test_bench_input_errors_are_one_line_with_exit_2(args, message, capsys):
    from tools.bench.__main__ import main

    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bench_report_files_that_cannot_be_written_stop_it_before_measuring(tmp_path, capsys):
    from tools.bench.__main__ import main

    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()
    for option, path, says in (("--json", "file/r.json", "file is a file, not a folder"),
                               ("--markdown", "folder", "folder is a folder")):
        assert main(["mixing", "--samples", "64", "--shard-samples", "8", "--world", "2", "--batch", "4",
                     "--buffers", "8", option, str(tmp_path / path)]) == 2
        out, err = capsys.readouterr()
        assert out == "" and len(err.strip().splitlines()) == 1  # nothing measured, one line
        assert err.startswith(f"bench mixing: error: {option} {tmp_path / path}: ") and says in err
    assert main(["mixing", "--samples", "64", "--shard-samples", "8", "--world", "2", "--batch", "4", "--buffers", "8",
                 "--markdown", str(tmp_path / "new" / "r.md")]) == 0  # a missing folder is made
    assert (tmp_path / "new" / "r.md").read_text().startswith("#")


def test_bench_argument_errors_exit_2():
    res = subprocess.run([sys.executable, "-m", "tools.bench", "pipeline", "--data", "x"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "error: the following arguments are required: --imagefolder" in res.stderr


def test_memory_bench_counts_the_saved_activations(tmp_path):
    from model import create_model
    from tools.bench.memory import computed_row, saved_activation_bytes

    torch.manual_seed(0)
    model = create_model("mae_vit_tiny_patch16", img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                         decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    # fp32: the per-image slope is exact and at least the encoder's and decoder's token activations (5 + 17 tokens)
    two, four = saved_activation_bytes(model, 2, "fp32"), saved_activation_bytes(model, 4, "fp32")
    assert four - two > 0 and (four - two) % 2 == 0
    assert (four - two) // 2 >= 4 * 32 * (5 + 17) * 2
    row = computed_row("mae_vit_tiny_patch16", "fp32", torch.device("cpu"))
    assert row["static"] == 16 * sum(p.numel() for p in create_model("mae_vit_tiny_patch16").parameters()
                                     if p.requires_grad) + 4 * 197 * (192 + 512)  # + the fixed position tables


# ------------------------------------------------------------------------------------------------------------------
# --all-checkpoints


@pytest.fixture(scope="module")
def run_with_checkpoints(tmp_path_factory) -> tuple[Path, Path, Path]:
    from train.pretrain import run

    root = tmp_path_factory.mktemp("allck")
    write_tiny_shards(root / "train", num_samples=16, num_classes=4, per_shard=8, size=(20, 20))
    write_tiny_shards(root / "val", num_samples=8, num_classes=4, per_shard=8, size=(20, 20), split="val", seed=1)
    cfg = config_from_args(["--data", str(root / "train"), "--out", str(root / "run"), "--model",
                            "supmae_vit_tiny_patch16", *ENC, "--img-size", "16", "--batch-size", "4", "--epochs", "1",
                            "--warmup-epochs", "0", "--lr", "1e-3", "--ckpt-every", "2", "--keep", "5", *QUIET])
    threads = torch.get_num_threads()
    assert run(cfg, DistEnv()) == 0
    torch.set_num_threads(threads)
    return root / "run", root / "train", root / "val"


def test_knn_all_checkpoints_evaluates_those_without_a_result(run_with_checkpoints, capsys):
    from train.eval import knn
    from train.eval.results import read_result, result_path

    run, train, val = run_with_checkpoints
    cks = sorted((run / "checkpoints").glob("step-*.pt"))
    assert [c.name for c in cks] == ["step-000000002.pt", "step-000000004.pt"]
    common = ["--data", str(train), "--eval-data", str(val), "--batch-size", "8", "--data-threads", "1"]
    assert knn.run(knn.check(["--ckpt", str(cks[0]), *common, "--k", "3"]), DistEnv()) == 0
    first = result_path(cks[0], "knn").read_bytes()
    assert knn.run(knn.check(["--ckpt", str(run), "--all-checkpoints", *common]), DistEnv()) == 0
    assert result_path(cks[0], "knn").read_bytes() == first  # had a result: not evaluated again
    assert read_result(result_path(cks[1], "knn"))["step"] == 4
    capsys.readouterr()
    assert knn.run(knn.check(["--ckpt", str(run), "--all-checkpoints", *common]), DistEnv()) == 0
    assert "nothing to do" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--all-checkpoints takes --ckpt RUN .* and no --out"):
        knn.check(["--ckpt", str(run), "--all-checkpoints", *common, "--out", "x"])
    with pytest.raises(ValueError, match="--all-checkpoints: --ckpt .* is not a folder"):
        knn.check(["--ckpt", str(cks[0]), "--all-checkpoints", *common])


def test_knn_all_checkpoints_skips_and_lists_a_damaged_checkpoint_also_the_first(run_with_checkpoints, tmp_path,
                                                                                  capsys):
    import shutil

    from train.eval import knn
    from train.eval.results import read_result, result_path

    src, train, val = run_with_checkpoints
    run = tmp_path / "run"
    shutil.copytree(src / "checkpoints", run / "checkpoints", ignore=shutil.ignore_patterns("*.json"))
    cks = sorted((run / "checkpoints").glob("step-*.pt"))
    cks[0].write_bytes(cks[0].read_bytes()[:5000])  # the oldest, evaluated first, cut short
    args = ["--ckpt", str(run), "--all-checkpoints", "--data", str(train), "--eval-data", str(val), "--batch-size",
            "8", "--data-threads", "1", "--k", "3"]
    for _ in range(2):  # again: the evaluated one is not redone, the damaged one is listed again
        capsys.readouterr()
        assert knn.run(knn.check(args), DistEnv()) == 0
        err = capsys.readouterr().err
        assert f"1 checkpoint(s) skipped:\n  {cks[0]}: " in err and "not a readable checkpoint archive" in err
        assert not result_path(cks[0], "knn").exists() and read_result(result_path(cks[1], "knn"))["step"] == 4
    first = result_path(cks[1], "knn").read_bytes()
    assert knn.run(knn.check(args), DistEnv()) == 0
    assert result_path(cks[1], "knn").read_bytes() == first


@pytest.mark.slow
def test_linprobe_all_checkpoints_runs_one_probe_per_checkpoint(run_with_checkpoints):
    from train.eval import linprobe
    from train.eval.results import read_result, result_path

    run, train, val = run_with_checkpoints
    args = ["--ckpt", str(run), "--all-checkpoints", "--data", str(train), "--eval-data", str(val), "--batch-size",
            "4", "--epochs", "1", "--warmup-epochs", "0", "--log-every", "2", *QUIET]
    assert linprobe.run(linprobe.check(args), DistEnv()) == 0
    for step in (2, 4):
        ck = run / "checkpoints" / f"step-{step:09d}.pt"
        result = read_result(result_path(ck, "linprobe"))
        assert result["step"] == step and result["samples"] == 8
        assert (run / "eval" / f"step-{step:09d}.linprobe" / "eval.json").is_file()


def test_all_checkpoints_stops_between_checkpoints_on_a_signal(run_with_checkpoints, capsys):
    from train.eval import knn
    from train.eval.results import result_path

    class Stopped:  # stands in for StopRequest after SIGTERM
        def agreed(self) -> bool:
            return True

    run, train, val = run_with_checkpoints
    cks = sorted((run / "checkpoints").glob("step-*.pt"))
    for ck in cks:
        result_path(ck, "knn").unlink(missing_ok=True)
    args = ["--ckpt", str(run), "--all-checkpoints", "--data", str(train), "--eval-data", str(val), "--batch-size",
            "8", "--data-threads", "1"]
    assert knn.run(knn.check(args), DistEnv(), Stopped()) == 0
    assert [result_path(ck, "knn").is_file() for ck in cks] == [True, False]
    assert "stop signal: 1 checkpoint(s) left for the next run" in capsys.readouterr().err
