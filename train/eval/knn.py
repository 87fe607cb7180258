"""k-NN accuracy of a frozen encoder (DINO's weighted k-NN), as a library function and `./launch.sh knn`.

    result = knn_eval("runs/supmae/checkpoints/step-000012000.pt", train_loader, eval_loader, KnnSettings())
    result.top1, result.top5, result.samples

    ./launch.sh knn --ckpt RUN_DIR_OR_FILE --data TRAIN_SHARDS --eval-data EVAL_SHARDS [--k 20] [--out DIR]
    ./launch.sh knn --ckpt RUN_DIR --all-checkpoints --data ... --eval-data ...   # every checkpoint without a result

Features: the encoder's pooled feature (mean of the normed patch tokens, or the cls token), L2-normalised, for a
subset of the training split (the bank; `train_samples`, 0 = all) and for every eval sample. Each eval sample's k
nearest bank features by cosine similarity vote for their labels with weight exp(similarity / T) (k = 20,
T = 0.07); the class with the largest total is the prediction, top-5 from the same totals.

Distributed: every rank extracts its share of the bank and of the eval set (the loaders' rank ranges), the bank is
all-gathered to every rank (padding dropped), each rank classifies its own eval samples in chunks (one matmul +
top-k each, features stay on the device), and the hit counts are summed across ranks: every eval sample counts
once. The bank subset is the first `train_samples` of the split spread evenly over the ranks' ranges (shards are
globally shuffled when written, so it is a random subset), the same on every call.

The loaders must be eval loaders (`LoaderConfig(train=False)`: resize + centre crop, every sample once, in order);
`knn_eval` leaves them where they were, so the compute-to-accuracy tool can reuse two loaders for every checkpoint
of a run. It accepts a checkpoint path, a run folder, a `PretrainedSource`, or a model in memory (a
MaskedAutoencoderViT or a ViTEncoder).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from model.mae import MaskedAutoencoderViT
from pipeline.loaders.base import Loader
from pipeline.shards.shard_format import load_manifest
from train.config import LAUNCHER_HELP, RunConfig, options_help, parse_overrides
from train.config import option_field as _f
from train.distributed import DistEnv, StopRequest, control_group, seed_all
from train.entry import (
    SetupError,
    build_eval_loader,
    check_class_maps,
    check_writable,
    device_name,
    protocol_main,
    software_versions,
)
from train.eval.accuracy import TopKCounter
from train.eval.encoder import (
    GLOBAL_POOLS,
    RANDOM,
    EncoderOptions,
    PretrainedSource,
    ViTEncoder,
    build_vit,
    encoder_forward_flops,
    resolve_source,
)
from train.eval.results import checkpoints_to_evaluate, make_result, pending_checkpoints, write_result
from train.system.device import describe_environment, environment_record
from train.system.nvidia import detect_nvidia
from train.trainer import DTYPES, configure_tf32, resolve_compile, resolve_precision

TOPK = (1, 5)


@dataclass(frozen=True)
class KnnSettings:
    """How the k-NN classifier votes and what it reads."""

    k: int = 20
    temperature: float = 0.07
    train_samples: int = 0  # bank size: the first N samples of the training split (0 = all)
    feature: str = "avg"  # "avg" (mean of the normed patch tokens) | "token" (cls token)
    chunk_size: int = 1024  # eval samples per similarity matmul: (chunk, bank) scores at a time
    precision: str = "auto"  # autocast of the encoder: auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32
    compile: bool = False  # torch.compile the encoder (pays off only for large evaluation sets)

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"--k {self.k} is invalid: must be an integer >= 1")
        if not self.temperature > 0:
            raise ValueError(f"--temperature {self.temperature} is invalid: must be a number > 0")
        if self.train_samples < 0:
            raise ValueError(f"--train-samples {self.train_samples} is invalid: must be an integer >= 0 (0 = all)")
        if self.feature not in GLOBAL_POOLS:
            raise ValueError(f"--feature {self.feature} is invalid: must be one of {', '.join(GLOBAL_POOLS)}")
        if self.chunk_size < 1:
            raise ValueError(f"--chunk-size {self.chunk_size} is invalid: must be an integer >= 1")
        if self.precision not in ("auto", *DTYPES):
            raise ValueError(f"--precision {self.precision} is invalid: must be one of auto, {', '.join(DTYPES)}")


@dataclass(frozen=True)
class KnnResult:
    top1: float
    top5: float
    samples: int  # eval samples classified (all ranks)
    bank: int  # training samples in the bank (all ranks)
    feature_dim: int
    seconds: float  # wall time of knn_eval (feature extraction and voting)
    images: int  # images the encoder ran on (bank + eval, all ranks)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------------------------
# The classifier


def knn_classify(features: Tensor, bank: Tensor, bank_labels: Tensor, num_classes: int, k: int,
                 temperature: float) -> Tensor:
    """(N, num_classes) vote totals of L2-normalised `features` (N, D) against the bank (M, D) with labels (M,):
    the k most similar bank entries (cosine similarity s) each add exp(s / temperature) to their label."""
    sims = features @ bank.T  # (N, M)
    k = min(k, bank.shape[0])
    top_sims, top_idx = sims.topk(k, dim=1)
    weights = (top_sims.float() / temperature).exp()
    votes = torch.zeros(features.shape[0], num_classes, dtype=torch.float32, device=features.device)
    return votes.scatter_add_(1, bank_labels[top_idx], weights)


class FeatureEncoder(nn.Module):
    """(N, D) L2-normalised pooled features of an encoder, without gradients (knn_eval puts it in eval mode)."""

    def __init__(self, vit: ViTEncoder):
        super().__init__()
        self.vit = vit

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return F.normalize(self.vit.features(images).float(), dim=1)


def encoder_for(what: Any, feature: str, img_size: int = 0) -> tuple[FeatureEncoder, PretrainedSource | None]:
    """The feature encoder of a checkpoint path / run folder / PretrainedSource / MaskedAutoencoderViT (pooled by
    `feature`), or of a ViTEncoder as it is (its own pooling)."""
    if isinstance(what, ViTEncoder):
        return FeatureEncoder(what), None
    if isinstance(what, MaskedAutoencoderViT):
        what = PretrainedSource.from_model(what)
    elif isinstance(what, (str, Path)):
        what = resolve_source(what)
    if not isinstance(what, PretrainedSource):
        raise TypeError(f"knn_eval needs a checkpoint path, run folder, PretrainedSource or model, got {type(what)}")
    return FeatureEncoder(build_vit(what, 0, feature, fc_norm=False, img_size=img_size)), what


def _extract(encoder: nn.Module, dim: int, loader: Loader, limit: int | None, device: torch.device,
             autocast: Any) -> tuple[Tensor, Tensor]:
    """(features (n, D), labels (n,)) of one epoch of an eval loader on this rank, padding dropped, stopping after
    `limit` samples (None = the whole epoch; then the loader stands at its next epoch, which reads the same).
    Stopped early, the loader is put back where it was, so the next call reads the same subset."""
    state = loader.state_dict()
    feats, labels = [], []
    taken = 0
    for b in loader:
        # Eval loaders put padding last (RankLayout), so a batch's real samples are its first num_valid rows.
        n = b.num_valid if limit is None else min(b.num_valid, limit - taken)
        if n > 0:
            with autocast():
                feats.append(encoder(b.images.to(device, non_blocking=True))[:n])
            labels.append(b.labels.to(device, non_blocking=True)[:n])
            taken += n
        if limit is not None and taken >= limit:
            loader.load_state_dict(state)
            break
    if not feats:  # a rank whose share of a small bank is empty
        return torch.empty(0, dim, device=device), torch.empty(0, dtype=torch.int64, device=device)
    return torch.cat(feats), torch.cat(labels)


def _all_gather_rows(x: Tensor, env: DistEnv) -> Tensor:
    """Every rank's rows of `x` (n_r, ...) concatenated in rank order, on every rank."""
    if not env.distributed:
        return x
    counts = [None] * env.world_size
    dist.all_gather_object(counts, x.shape[0], group=control_group())
    width = max(counts)
    padded = torch.zeros((width, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(env.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, counts, strict=True)])


def bank_share(train_samples: int, num_samples: int, env: DistEnv) -> int | None:
    """How many bank samples this rank takes (None = its whole range)."""
    if train_samples == 0 or train_samples >= num_samples:
        return None
    return train_samples * (env.rank + 1) // env.world_size - train_samples * env.rank // env.world_size


def knn_eval(encoder: Any, train_loader: Loader, eval_loader: Loader, settings: KnnSettings = KnnSettings(),
             env: DistEnv | None = None, img_size: int = 0) -> KnnResult:
    """k-NN top-1 / top-5 of `encoder` (checkpoint path, run folder, PretrainedSource, MaskedAutoencoderViT or
    ViTEncoder) with the bank from `train_loader` and the queries from `eval_loader` (both eval-mode loaders of this
    rank). A collective when distributed: every rank calls it. See the module docstring."""
    env = env or DistEnv()
    device = env.device
    t0 = time.monotonic()
    module, _ = encoder_for(encoder, settings.feature, img_size)
    was_training = module.vit.training  # a ViTEncoder passed in gets its mode back at the end
    module.to(device, memory_format=torch.channels_last).eval()
    try:
        return _knn(module, train_loader, eval_loader, settings, env, t0)
    finally:
        module.vit.train(was_training)


def _knn(module: FeatureEncoder, train_loader: Loader, eval_loader: Loader, settings: KnnSettings, env: DistEnv,
         t0: float) -> KnnResult:
    device = env.device
    features = torch.compile(module) if settings.compile else module
    dim = module.vit.num_features
    precision = resolve_precision(settings.precision, device)

    def autocast():
        if precision == "fp32":
            return torch.autocast(device.type, enabled=False)
        return torch.autocast(device.type, dtype=DTYPES[precision])

    limit = bank_share(settings.train_samples, train_loader.num_samples, env)
    bank, bank_labels = _extract(features, dim, train_loader, limit, device, autocast)
    bank_images = bank.shape[0]
    bank, bank_labels = _all_gather_rows(bank, env), _all_gather_rows(bank_labels, env)
    if bank.shape[0] == 0:
        raise ValueError("the k-NN bank is empty: the training loader gave no samples")
    if device.type == "cuda":
        bank = bank.half()  # halves the bank's memory; cosine similarities keep ~3 significant digits
    num_classes = max(train_loader.num_classes, eval_loader.num_classes)

    counter = TopKCounter(TOPK, device)
    queries, query_labels = _extract(features, dim, eval_loader, None, device, autocast)
    for start in range(0, queries.shape[0], settings.chunk_size):
        q = queries[start : start + settings.chunk_size].to(bank.dtype)
        y = query_labels[start : start + settings.chunk_size]
        votes = knn_classify(q, bank, bank_labels, num_classes, settings.k, settings.temperature)
        counter.update(votes, y, None, len(y))
    metrics = counter.result(env)
    images = torch.tensor([bank_images + queries.shape[0]], dtype=torch.int64)
    if env.distributed:
        dist.all_reduce(images, group=control_group())
    return KnnResult(metrics["top1"], metrics["top5"], metrics["samples"], bank.shape[0], bank.shape[1],
                     time.monotonic() - t0, int(images.item()))


# ----------------------------------------------------------------------------------------------------------------
# ./launch.sh knn


@dataclass
class KnnConfig(EncoderOptions, RunConfig):
    """`./launch.sh knn` options."""

    out: str = _f("", "also write the result as OUT/eval.json (required for --ckpt random)")
    eval_data: str = _f("", "held-out shard folder: the queries; required")
    batch_size: int = _f(256, "feature-extraction batch per process")
    compile: str = _f("off", "torch.compile the encoder: auto (on for CUDA) | on | off (one pass rarely pays)")
    k: int = _f(20, "neighbours that vote")
    temperature: float = _f(0.07, "vote weight exp(cosine similarity / T)")
    train_samples: int = _f(0, "bank: the first N training samples, spread over the ranks (0 = the whole split)")
    feature: str = _f("avg", "avg (mean of the normed patch tokens) | token (cls token)")
    chunk_size: int = _f(1024, "queries per similarity matmul")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.eval_data:
            raise ValueError("--eval-data is required (the held-out shard folder the accuracy is measured on)")
        if self.ckpt == RANDOM and not self.out:
            raise ValueError("--ckpt random needs --out (there is no checkpoint to write the result beside)")
        self.settings(torch.device("cpu"))  # validates k, temperature, ...

    def settings(self, device: torch.device) -> KnnSettings:
        return KnnSettings(self.k, self.temperature, self.train_samples, self.feature, self.chunk_size,
                           self.precision, resolve_compile(self.compile, device))


def help_text() -> str:
    return "\n".join([
        "usage: ./launch.sh knn --ckpt RUN_DIR_OR_FILE --data TRAIN_SHARDS --eval-data EVAL_SHARDS "
        "[--field-name value ...] [--out DIR]",
        "", "Weighted k-NN accuracy (DINO) of the frozen encoder's L2-normalised features.", "",
        "Options:", *options_help(KnnConfig, "Model options (with --ckpt random: override the preset; with a .pth: "
                                             "override what is inferred):"),
        "", *LAUNCHER_HELP,
    ])


def check(argv: list[str]) -> KnnConfig:
    if any(a in ("-h", "--help") for a in argv):
        print(help_text())
        raise SystemExit(0)
    cfg = KnnConfig(**parse_overrides(argv, KnnConfig))
    cfg.check_ckpt_exists()
    if cfg.all_checkpoints:
        pending_checkpoints(cfg.ckpt, "knn")  # the folder holds checkpoints
    if cfg.out:
        check_writable(cfg.out, "--out")
    else:  # the result goes beside the checkpoint only
        path = Path(cfg.ckpt)
        check_writable(path if path.is_dir() else path.parent, "--ckpt")
    train, _ = load_manifest(cfg.data)
    evals, _ = load_manifest(cfg.eval_data)
    check_class_maps(train, evals, f"--eval-data {cfg.eval_data}")
    return cfg


def run(cfg: KnnConfig, env: DistEnv, stop: StopRequest | None = None) -> int:
    def say(message: str) -> None:
        print(f"knn: {message}", file=sys.stderr)

    try:
        seed_all(cfg.seed)
        # --all-checkpoints: every checkpoint of the run without a result, through the same two loaders.
        targets: list[Path | None] = checkpoints_to_evaluate(cfg.ckpt, "knn", env) if cfg.all_checkpoints else [None]
        if not targets:
            if env.is_main:
                print(f"knn: every checkpoint of {cfg.ckpt} has a k-NN result already; nothing to do")
            return 0
        # Built before any data is read: weights that do not fit the encoder (a partial state dict) are bad input.
        # With --all-checkpoints one that cannot be read is skipped and listed, also when it is the first.
        skipped: list[str] = []
        while True:
            try:
                source = _source(cfg, targets[0], say)
                encoder, _ = encoder_for(source, cfg.feature, cfg.img_size)
                break
            except (ValueError, FileNotFoundError) as e:
                if not cfg.all_checkpoints:
                    raise
                _skip(targets.pop(0), e, skipped, say)
                if not targets:
                    _list_skipped(skipped, env)
                    return 0
        img_size = cfg.img_size or source.model_cfg.img_size
        loaders = [build_eval_loader(data, batch, img_size, cfg.data_backend, cfg.data_threads, cfg.seed, env,
                                     cfg.decode)
                   for data, batch in ((cfg.data, cfg.batch_size), (cfg.eval_data, cfg.eval_batch_size or cfg.batch_size))]
    except (ValueError, FileNotFoundError) as e:
        raise SetupError(str(e)) from e
    configure_tf32(cfg.tf32, env.device)
    settings = cfg.settings(env.device)
    environment = environment_record(env.device, compile=settings.compile,
                                     nvidia=detect_nvidia() if env.is_main else None)
    if env.is_main:
        say(describe_environment(environment))
    for i, target in enumerate(targets):
        if i:
            if stop is not None and stop.agreed():
                say(f"stop signal: {len(targets) - i} checkpoint(s) left for the next run")
                break
            try:  # one damaged checkpoint does not stop the others
                source = _source(cfg, target, say)
                encoder, _ = encoder_for(source, cfg.feature, cfg.img_size)
            except (ValueError, FileNotFoundError) as e:
                _skip(target, e, skipped, say)
                continue
        result = knn_eval(encoder.vit, loaders[0], loaders[1], settings, env, cfg.img_size)
        if env.is_main:
            record = knn_record(source, result, {**cfg.to_dict(), "img_size": img_size}, env, environment)
            for path in write_result(record, cfg.out or None, say=say):
                print(f"knn: result {path}")
            print(f"knn: {source.name} (step {source.step}): top-1 {100 * result.top1:.2f}%  top-5 "
                  f"{100 * result.top5:.2f}%  on {result.samples} images, bank {result.bank} x {result.feature_dim}, "
                  f"k {cfg.k}, T {cfg.temperature}, {result.seconds:.1f} s")
    _list_skipped(skipped, env)
    return 0


def _skip(target: Path | None, error: Exception, skipped: list[str], say) -> None:
    skipped.append(f"{target}: {error}")
    say(f"skipping {target}: {error}")


def _list_skipped(skipped: list[str], env: DistEnv) -> None:
    if skipped and env.is_main:
        print(f"knn: {len(skipped)} checkpoint(s) skipped:\n  " + "\n  ".join(skipped), file=sys.stderr)


def _source(cfg: KnnConfig, target: Path | None, warn) -> PretrainedSource:
    """The weights of one evaluation: --ckpt itself, or one checkpoint of --all-checkpoints."""
    if target is None:
        return cfg.source(cfg.seed, warn=warn)
    return resolve_source(target, model_args=cfg.model_args, warn=warn)


def knn_record(source: PretrainedSource, result: KnnResult, settings: dict[str, Any],
               env: DistEnv | None = None, environment: dict[str, Any] | None = None) -> dict[str, Any]:
    """The result record (train.eval.results) of a k-NN evaluation of `source`; `settings` is stored as given (the
    command line's fields, or the caller's KnnSettings plus data folders), it should hold "img_size"; environment:
    train.system.device.environment_record of the run."""
    env = env or DistEnv()
    img_size = settings.get("img_size") or source.model_cfg.img_size
    flops = encoder_forward_flops(source.model_cfg, img_size) * result.images
    return make_result(
        "knn", source, {"top1": result.top1, "top5": result.top5, "samples": result.samples, "bank": result.bank,
                        "feature_dim": result.feature_dim},
        settings,
        {"images": result.images, "flops": flops, "seconds": result.seconds,
         "device_hours": result.seconds * env.world_size / 3600},
        env.world_size, device_name(env.device), software_versions(), environment=environment)


def main(argv: list[str] | None = None) -> int:
    return protocol_main("knn", list(sys.argv[1:] if argv is None else argv), check, run)


if __name__ == "__main__":
    sys.exit(main())
