"""The noise-aware MNIST-5k classifier of classifier guidance (Dhariwal & Nichol 2021): the main
job's U-Net encoder (configs/mnist.py) with a pooled head, trained on x_t of the same forward
process with the cross-entropy of the digit label:

    python -m diffusion_jax.main --config=configs/mnist_classifier.py --workdir=runs/mnist_clf
    python -m diffusion_jax.main --config=configs/mnist_classifier.py --workdir=runs/mnist_clf \
        --mode=eval     # accuracy by t in eval.json

Then guide a diffusion run with it:

    python -m diffusion_jax.main --config=configs/mnist.py --workdir=runs/mnist --mode=sample \
        --config.sampling.guidance=classifier --config.sampling.guidance_scale=2 \
        --config.sampling.classifier_workdir=runs/mnist_clf
"""

from configs import mnist


def get_config():
    config = mnist.get_config()
    config.task = 'noisy_classifier'
    config.model.num_classes = 10
    config.model.dropout = 0.1
    config.training.num_train_steps = 1500
    config.sampling.num_samples = 0
    config.eval.num_images = 500  # The whole test split, for the accuracy by t.
    return config
