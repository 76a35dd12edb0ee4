"""Every field of a run, with its meaning. Other configs start from this one and change a few.

    python -m diffusion_jax.main --config=configs/default.py --workdir=runs/default \
        --config.data.manual_dir=/path/with/cifar-10-binary.tar.gz

The defaults are the paper's CIFAR-10 setup (Ho et al. 2020, §4 and Appendix B); configs/cifar10.py
names it explicitly, configs/mnist.py is the CPU-sized main job.
"""

import ml_collections
from ml_collections import config_dict


def get_config():
    config = ml_collections.ConfigDict()
    config.seed = 0  # Base of every random draw: parameters, data order, noise (fold_in).
    # diffusion: train the U-Net denoiser | noisy_classifier: train p(y | x_t, t) on noised
    # images for classifier guidance (the model block then describes its encoder).
    config.task = 'diffusion'

    config.data = data = ml_collections.ConfigDict()
    # tfds builder: mnist5k | digits | cifar10 (from the manual archive) | folder (data.folder).
    data.name = 'cifar10'
    # data.name=folder: a directory of PNG/JPEG/WebP/BMP images, first-level subfolders as the
    # class labels (diffusion_jax/data/folder.py says how they are resized, cropped and split).
    data.folder = config_dict.placeholder(str)
    # Where tfds writes array_record files (None: the tfds default, ~/tensorflow_datasets).
    data.data_dir = config_dict.placeholder(str)
    data.manual_dir = config_dict.placeholder(str)  # Where manually downloaded archives are placed.
    data.image_size = 32  # H = W of the images; checked against the dataset.
    data.channels = 3  # Checked against the dataset.
    data.random_flip = False  # Horizontal flips: the paper's natural-image configs turn them on
    # (CIFAR-10, CelebA-HQ, LSUN church and bedroom); digits must not be mirrored.

    config.model = model = ml_collections.ConfigDict()  # Fields of models.UNet, passed as-is.
    model.ch = 128  # Base channel count.
    model.out_ch = 3  # Image channels C; 2C for learned variances, 3C for dual (4C dual + learned).
    model.ch_mult = (1, 2, 2, 2)  # Channel multiplier per resolution level.
    model.num_res_blocks = 2  # ResBlocks per level.
    model.attn_resolutions = (16,)  # Spatial sizes that get self-attention after each ResBlock.
    model.dropout = 0.1
    model.resamp_with_conv = True  # Strided-conv downsampling and conv after nearest upsampling.
    model.num_groups = 32  # GroupNorm groups.
    # Mixed precision (the TPU practice): bfloat16 compute for the convolutions, dense layers and
    # attention products; GroupNorm, softmax, the network output and the loss stay float32.
    model.dtype = 'float32'  # Compute dtype: float32 | bfloat16 (| float64 for tests).
    model.param_dtype = 'float32'  # Parameter (and EMA, Adam moment) storage dtype.
    # Gradient of the 3x3 convs: xla | matmul (faster on the CPU for >= 64 channels) |
    # bf16_matmul (bfloat16 convs as bfloat16 matmuls, forward too) | auto (on the CPU:
    # bf16_matmul for bfloat16 where it has bfloat16 units, else matmul for layers with >= 64
    # channels, else xla; xla on TPU and GPU).
    model.conv_backward = 'auto'
    # U-Net: 0 = unconditional, K = class-conditional on labels 0..K-1 plus the null label K
    # (classifier-free guidance). noisy_classifier: the number of classes it predicts.
    model.num_classes = 0

    config.diffusion = diffusion = ml_collections.ConfigDict()
    diffusion.beta_schedule = 'linear'  # linear|cosine|quad|const|jsd|warmup10|warmup50.
    diffusion.beta_start = 1e-4
    diffusion.beta_end = 0.02
    diffusion.num_timesteps = 1000  # T.
    diffusion.mean_type = 'eps'  # eps | x0 | xprev | dual: what the network predicts.
    diffusion.var_type = 'fixedlarge'  # fixedlarge | fixedsmall | learned | learned_range.
    diffusion.loss_type = 'mse'  # mse (L_simple) | kl (true bound) | hybrid (IDDPM).
    diffusion.hybrid_lambda = 0.001  # λ in L_simple + λ L_vlb.
    # ddpm (Ho et al.) | vp | subvp | ve (score SDEs, Song et al. 2021) | ncsn (Song & Ermon 2019).
    # For SDEs num_timesteps is the samplers' N; for ncsn the number L of noise levels.
    diffusion.process = 'ddpm'
    diffusion.beta_min = 0.1  # vp, subvp: β(t) = β_min + t (β_max - β_min).
    diffusion.beta_max = 20.0
    # ve, ncsn: geometric σ from σ_max down to σ_min. 0.01 / 50 are Song et al.'s CIFAR-10 values
    # for data in [0, 1]; our data are in [-1, 1], so the score configs double them.
    diffusion.sigma_min = 0.01
    diffusion.sigma_max = 50.0
    diffusion.train_eps = 1e-5  # SDEs: t ~ U[train_eps, 1] in training.
    # SDEs: the samplers' end time (None: 1e-3 for VP and sub-VP, 1e-5 for VE).
    diffusion.sample_eps = config_dict.placeholder(float)
    diffusion.likelihood_weighting = False  # SDEs: λ(t) = g(t)² instead of std(t)².

    config.optim = optim = ml_collections.ConfigDict()
    optim.learning_rate = 2e-4
    optim.warmup_steps = 5000  # Linear warm-up from 0.
    # > 0: cosine decay to 0 at this step, after the warm-up; 0: constant (the paper).
    optim.lr_decay_steps = 0
    optim.grad_clip = 1.0  # Global-norm clipping (0 disables).
    optim.adam_b1 = 0.9
    optim.adam_b2 = 0.999
    optim.adam_eps = 1e-8
    optim.ema_decay = 0.9999  # EMA of the parameters; sampling and evaluation use the EMA.
    optim.ema_warmup = False  # Use min(ema_decay, (1 + step) / (10 + step)) for short runs.

    config.training = training = ml_collections.ConfigDict()
    training.batch_size = 128  # Global batch, split over every device of every process.
    # Gradient accumulation: each step runs its batch as this many microbatches, one after the
    # other (same loss and gradient; one microbatch's activations in memory at a time). Must
    # divide the images per device. A memory lever, not a speed one (docs/benchmarks.md).
    training.num_microbatches = 1
    training.num_train_steps = 800_000
    training.log_every = 100  # Scalars to TensorBoard and the log.
    training.sample_every = 0  # Steps between sample grids (0: only the final samples).
    training.sample_grid_size = 64
    training.checkpoint_every = 5000
    training.keep_checkpoints = 3
    training.parallel = 'jit'  # jit (NamedSharding) | shard_map (per-device loss, explicit pmean).
    training.clip_per_replica = False  # shard_map only: clip per replica before the mean.
    # Parameter sharding (FSDP, jit only): (regex, spec) pairs matched against state paths such
    # as 'params/down_0_block_0/conv1/kernel'; spec 'data' splits an array's last axis over the
    # devices (see diffusion_jax/parallel.py). () replicates everything (pure data parallelism).
    training.param_sharding = ()
    training.label_dropout = 0.1  # Conditional U-Net: P(label -> null label), for CFG.
    # A non-finite loss or gradient: fail (stop, naming the step and metric) | skip (drop the
    # update, count it, stop when more than max_consecutive_skips come in a row). Non-finite
    # states are never saved either way.
    training.nan_policy = 'fail'
    training.max_consecutive_skips = 10

    config.sampling = sampling = ml_collections.ConfigDict()
    sampling.num_samples = 256  # Written to samples.npz / samples.png after training.
    sampling.batch_size = 256  # Images per sampler call.
    sampling.clip_denoised = True  # Clip x̂_0 to [-1, 1] in every reverse step.
    sampling.chunk_size = 100  # Reverse steps per jitted call: progress bar and x̂_0 snapshots.
    # ancestral (Algorithm 2, all T steps) | ddim (ddpm); pc | ode (SDEs); langevin (ncsn).
    sampling.sampler = 'ancestral'
    sampling.num_steps = 50  # ddim: network evaluations (chunks scale to chunk_size / T of them).
    sampling.eta = 0.0  # ddim: 0 deterministic .. 1 (with all T steps: ancestral, fixedsmall).
    sampling.timestep_spacing = 'leading'  # ddim: leading | trailing | section counts '10,10,10'.
    # pc (SDEs): predictor euler_maruyama | reverse_diffusion | ancestral | none, then corrector
    # langevin | none with `n_corrector` steps of signal-to-noise ratio `snr`.
    sampling.predictor = 'reverse_diffusion'
    sampling.corrector = 'langevin'
    sampling.n_corrector = 1
    sampling.snr = 0.16
    sampling.ode_solver = 'tsit5'  # ode (SDEs): tsit5 | dopri5 | dopri8 | heun, adaptive steps.
    sampling.ode_rtol = 1e-5
    sampling.ode_atol = 1e-5
    sampling.n_steps_each = 100  # langevin (ncsn): steps per noise level.
    sampling.step_lr = 2e-5  # langevin: ε of the step α_i = ε σ_i² / σ_L².
    sampling.denoise = True  # pc, ode, langevin: end with a noise-free (Tweedie) step.
    # none | classifier_free (conditional U-Net: (1 + w) ε(x, y) - w ε(x, ∅), any sampler) |
    # classifier (μ + s Σ ∇ log p(y | x_t), ancestral or ddim; needs classifier_workdir).
    sampling.guidance = 'none'
    sampling.guidance_scale = 0.0  # w (classifier_free) or s (classifier).
    sampling.labels = 'cycle'  # Class of each sample: cycle | random | e.g. '3' or '1,7'.
    sampling.classifier_workdir = config_dict.placeholder(str)  # A task=noisy_classifier run.

    config.edit = edit = ml_collections.ConfigDict()  # --mode=edit (SDEdit).
    # Guide images: .png (a grid of image_size tiles, or one image) or .npz (`images`, uint8
    # [N, H, W, C]); None: the stroke demo, blocky strokes of the first test images.
    edit.guide = config_dict.placeholder(str)
    edit.mask = config_dict.placeholder(str)  # Same format, nonzero = keep the guide's pixel.
    edit.t0 = 0.5  # Start time as a fraction of the diffusion time (0: the guide itself).
    edit.repeats = 1  # K rounds of noise-and-denoise, each starting from the last output.
    edit.num_images = 32  # Stroke demo: how many test digits.
    edit.stroke_block = 4  # Stroke demo: tile size of the blocky strokes.

    config.eval = evaluation = ml_collections.ConfigDict()  # --mode=eval
    evaluation.num_images = 256  # Test images in the bits/dim bound (T forward passes each).
    evaluation.batch_size = 128  # Images per bound evaluation call.
    evaluation.timestep_chunk = 100  # Timesteps per jitted call (progress bar granularity).
    evaluation.interpolation_t = 500  # Encoding time of interpolation.png (paper Fig. 8).
    # Inception FID / IS of samples.npz: the FID Inception weights as .npz (convert them with
    # scripts/convert_inception_weights.py) and reference statistics (.npz with mu, sigma).
    evaluation.inception_weights = config_dict.placeholder(str)
    # Unset: computed once from the training split and cached (evaluation/reference_stats.py).
    evaluation.fid_reference = config_dict.placeholder(str)
    evaluation.fid_reference_images = 50_000  # Training images in it (all, if fewer).
    evaluation.fid_cache_dir = config_dict.placeholder(str)  # Default <data_dir>/fid_reference.
    evaluation.inception_batch_size = 100
    evaluation.inception_splits = 10  # IS: mean over this many splits of the samples.
    return config
