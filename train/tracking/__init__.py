"""Experiment tracking beyond metrics.jsonl (train/metrics.py's RunLog drives these on rank 0):

    tensorboard_sink.py   TensorBoard: the scalars of every record, pictures, the resolved config as text and as
                          hyper-parameters
    wandb_sink.py         Weights & Biases (`--wandb [PROJECT]`): the same scalars with images seen and training
                          PFLOPs as extra x-axes, the config, the pictures; WANDB_MODE=offline keeps it local
    pictures.py           reconstruction grids: at every checkpoint of a pre-training run, and `./launch.sh visualize`
"""
