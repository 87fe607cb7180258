"""What this machine has and how the software on it was built: NVIDIA GPUs and driver (`nvidia`), the torch and
DALI builds a driver can run (`builds`), and at run time whether torch can use the GPU that is there (`device`).

`nvidia` and `builds` use the standard library only: `./launch.sh setup` runs them before torch is installed.
"""
