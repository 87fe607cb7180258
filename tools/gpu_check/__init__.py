"""`tools/gpu_check.sh`: one command that proves a GPU machine runs this project's whole GPU path, and measures it.

    tools/gpu_check.sh [OUTDIR]              on a machine with an NVIDIA GPU (about 8 minutes on one H100/H200)
    tools/gpu_check.sh --cpu-smoke [OUTDIR]  the same steps at tiny shapes on the CPU (the test suite runs it)

Steps, each in its own process with its own time budget (the CPU smoke run: all in one process); each writes
OUTDIR/steps/NN-name.json the moment it ends (also its partial results when it runs out of time), so a later timeout
or crash loses nothing:

  1 environment   GPU, driver, torch and its CUDA build, triton, timm, torchvision, DALI / pytest importable or not,
                  the MFU peak figures the logs will use for this GPU
  2 parity        the fused Triton kernels compiled for this GPU against the reference ops, fp32 / bf16 / fp16, at
                  ViT-B/16 shapes and patch 14, forward and gradients, and the whole model; then the GPU-sensitive
                  test files under pytest (skipped with the reason when pytest is missing)
  3 train-step    SupMAE and MAE ViT-B/16 training step at batch 256: the original recipe (fp16, float NCHW input,
                  reference masking, eager) vs bf16 + fused vs bf16 + fused + torch.compile: images/s, TFLOP/s,
                  MFU, peak memory
  4 trainer       the real trainer (train.pretrain) for 50 steps on shards the check writes, with --sync-check
                  (any host sync in the hot path is an error), a checkpoint at step 25 and a resumed run that must
                  reproduce steps 26-50 exactly
  5 ddp           an NCCL process group on the one GPU with the trainer forced through its DDP wrapper (world size 1)
  6 dali          when DALI imports: the `mixed` train pipeline on ImageNet-sized JPEGs at hw_decoder_load 0, 0.65
                  and 1.0, the eval pipeline, and the data-wait share of the real loop with DALI feeding SupMAE
                  ViT-B (skipped with the reason when DALI is missing)

After every step: OUTDIR/summary.md and summary.json (one table of every step plus the step-3 and step-6 tables),
ready for docs/benchmarks.md. Exit status 0 when no step failed or ran out of time (skipped steps are not failures),
1 otherwise.
"""
