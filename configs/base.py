"""Base configuration: every field the library reads, with the paper's values.

Experiment files start from ``get_config()`` here and change a few fields.
Override any field on the command line, e.g. ``--config.train.num_steps=10``;
an unknown key is an error.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    # Dataset: 'photo_patches', 'digits', 'imagenet_folder' or 'imagenet2012'.
    config.data = ml_collections.ConfigDict()
    config.data.name = "imagenet_folder"
    config.data.image_size = 256
    config.data.data_dir = (
        ""  # empty: $STOCHINTERP_DATA_DIR or ~/.cache/stochinterp/tfds
    )
    config.data.source_dir = ""  # imagenet_folder only: folder with train/ and val/
    config.data.random_flip = True
    config.data.shuffle_seed = 0
    config.data.eval_split = ""  # "": the held-out split (test, or validation)

    # Path x_t = alpha x0 + beta x1 + gamma z ('linear' or 'trigonometric';
    # gamma 'zero' or 'sqrt' = sqrt(gamma_scale t (1 - t))).
    config.interpolant = ml_collections.ConfigDict()
    config.interpolant.name = "linear"
    config.interpolant.gamma = "zero"
    config.interpolant.gamma_scale = 1.0

    # Coupling: 'independent', 'inpainting' or 'superres'.
    config.coupling = ml_collections.ConfigDict()
    config.coupling.name = "inpainting"
    config.coupling.grid = 8  # in-painting: tiles per side
    config.coupling.p = 0.3  # in-painting: probability a tile is hidden
    config.coupling.factor = 4  # super-resolution: down/up factor, >= 2
    config.coupling.sigma = 1.0  # super-resolution: noise added to U(D(x1))
    # independent only: "none", "inpainting" or "superres" conditioning
    config.coupling.baseline_condition = "none"
    config.coupling.num_classes = 0  # 0: no class conditioning
    config.coupling.p_uncond = 0.0  # label drop probability (guidance)
    config.coupling.class_channel = False

    # The paper's U-Net (dim 256, dim_mults (1, 1, 2, 3, 4) at 256x256).
    config.model = ml_collections.ConfigDict()
    config.model.dim = 256
    config.model.dim_mults = (1, 1, 2, 3, 4)
    config.model.resnet_block_groups = 8
    config.model.learned_sinusoidal = True
    config.model.learned_sinusoidal_dim = 32  # sin + cos features
    config.model.attn_heads = 4
    config.model.attn_dim_head = 32
    config.model.linear_attention = True  # at every level, as in the paper
    config.model.dtype = "float32"  # 'bfloat16': bf16 compute, fp32 parameters

    # Adam with a staircase decay and global-norm clipping.
    config.optim = ml_collections.ConfigDict()
    config.optim.learning_rate = 2e-4
    config.optim.decay_rate = 0.99
    config.optim.decay_steps = 1000
    config.optim.grad_clip = 1e4
    config.optim.b1 = 0.9
    config.optim.b2 = 0.999

    config.train = ml_collections.ConfigDict()
    config.train.global_batch = 32
    # > 1: each device takes its gradient alone, in this many passes over
    # equal parts of its batch, and the devices average once per step: on 2
    # CPU cores 5-10 % faster for the paper's network at 32x32, batch 32
    # (docs/benchmarks/unet.md), slower for small ones; no less memory (the
    # compiled step's buffers are as large). 1: one partitioned program.
    # The random draws differ from 1's.
    config.train.micro_batches = 1
    config.train.num_steps = 200_000
    config.train.max_seconds = 0.0  # > 0: stop (and checkpoint) after this long
    config.train.t_min = 0.0
    config.train.t_max = 1.0
    config.train.denoiser = False  # also learn E[z | x_t] (needs gamma > 0)
    config.train.log_every = 100
    config.train.loss_time_bins = 10
    config.train.checkpoint_every = 5000
    config.train.keep_checkpoints = 3
    config.train.async_checkpoint = True
    config.train.ema_decay = 0.9999
    config.train.ema_warmup = True  # decay min(ema_decay, (1 + n) / (10 + n))

    # ODE/SDE sampler used for evaluation and by launch.sample.
    config.sampler = ml_collections.ConfigDict()
    config.sampler.method = "dopri5"  # 'euler', 'heun', 'dopri5', 'euler_maruyama'
    # Steps of the fixed-step methods; None for dopri5 (the controller decides).
    config.sampler.num_steps = ml_collections.config_dict.placeholder(int)
    config.sampler.t_min = 1e-3
    config.sampler.t_max = 1.0 - 1e-3
    config.sampler.rtol = 1e-5
    config.sampler.atol = 1e-5
    config.sampler.max_steps = 4096
    config.sampler.eps_schedule = "decay"  # Euler-Maruyama: 'constant', 'decay', 'bump'
    config.sampler.eps_scale = 1.0
    # classifier-free guidance w in [-100, 100]; 1 = none
    config.sampler.guidance_scale = 1.0

    config.eval = ml_collections.ConfigDict()
    config.eval.num_images = 64
    # Images sampled at a time by the evaluation (0: all eval.num_images at
    # once); a smaller batch holds less in memory and changes the draws.
    config.eval.batch = 0
    config.eval.seed = 1234
    config.eval.use_ema = True
    config.eval.grid_images = 16  # shown in samples/inpaint.png
    # FID (stochinterp.fid): path of the converted Inception weights
    # (python -m launch.convert_inception); '' measures no FID.
    config.eval.fid_weights = ""
    # FID statistics to compare with (.npz with mu and sigma, e.g. of 50k
    # training images); '' compares with the ground truth of the same images.
    config.eval.fid_reference = ""
    config.eval.fid_batch = 64  # images per Inception forward pass

    # Locked: a misspelt field is an error, here, in experiments and on the CLI.
    config.lock()
    return config
