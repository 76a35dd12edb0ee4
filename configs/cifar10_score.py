"""Score-based models on CIFAR-10 as in their papers, for accelerators (the DDPM U-Net of
configs/cifar10.py; Song et al. 2021 used their NCSN++/DDPM++ networks instead):

    python -m diffusion_jax.main --config=configs/cifar10_score.py:ve --workdir=runs/cifar10_ve \
        --config.data.manual_dir=/path/with/cifar-10-binary.tar.gz

vp | subvp: β 0.1 → 20, N = 1000, Euler-Maruyama sampling; ve: σ 0.01 → 50 on [0, 1] data (0.02
→ 100 here), reverse diffusion + Langevin with snr 0.16; ncsn (Song & Ermon 2019): L = 10 levels
from 1 to 0.01 (2 to 0.02 here), 100 Langevin steps per level, ε = 2e-5 (8e-5 here). Training
follows Song et al.: batch 128, learning rate 2e-4 with 5000 warm-up steps, EMA 0.9999 (0.999 for
VE), gradient clipping 1, 1.3M steps.
"""

from configs import cifar10
from configs import mnist_score


def get_config(process='vp'):
    config = mnist_score.apply_process(cifar10.get_config(), process)
    if process == 've':
        config.diffusion.sigma_max = 100.0
        config.optim.ema_decay = 0.999
    config.training.num_train_steps = 1_300_000
    config.model.dropout = 0.1
    return config
