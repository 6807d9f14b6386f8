"""Shared defaults for every bag-jax experiment; the other configs import and override these.

Values follow the official GDFQ/AdaDFQ code (docs/algorithms.md, sections 5 and 6) for ResNet-20
on CIFAR-100. `get_config(method)` sets each method's own defaults:

  gdfq    batch 200, L_G = CE + 0.1 BNS, L_Q = CE + KD (T=20)                       (docs/algorithms.md 4.2, 6.1)
  adadfq  batch 16,  L_G = margin + (0.2 L_ds + 0.1 L_as) + BNS, L_Q = -T^2 H (T=20) (docs/algorithms.md 4.3, 6.2)
  bag     adadfq + the generator quantized at the student's bit-widths
        + channel-attention distillation (docs/algorithms.md 8.2, our reading of the paper)
  hast    4 epochs calibrating with a GDFQ generator, then the student on a fixed pool of 5,120
          optimised noise images: KD (alpha 20, T 20) + feature alignment (1000) + the same on
          sign-perturbed images; batch 64, 151 epochs, lr 1e-5 /10 at 20, 40, 60 (docs/algorithms.md 10.1)
  synq    hast + low-pass filter (D0 80) + Grad-CAM alignment (200) + selective CE (5, tau 0.5);
          batch 256, 100 epochs (docs/algorithms.md 10.2)
  bag_synq  bag + selective CE (0.5) + Grad-CAM alignment (50) + the perturbation term (1) on
          the generator's batches, activation ranges clipped by the L_p search (docs/algorithms.md 10.3)

Command-line overrides (`--config.quant.w_bits=4`) change single fields after that.
"""

import ml_collections
from ml_collections import config_dict

from bag_jax.methods import METHODS


def get_config(method: str = 'bag') -> ml_collections.ConfigDict:
    """Returns the CIFAR-100 ResNet-20 W3A3 experiment for `method` (one of METHODS)."""
    if method not in METHODS:
        raise ValueError(f'config argument {method!r} is not a method: choose one of {", ".join(METHODS)}.')
    # convert_dict=False: `sweep` holds a plain dict of dotted field names, which a nested
    # ConfigDict would refuse (and copies of the config would try to make one).
    c = ml_collections.ConfigDict(convert_dict=False)
    c.mode = 'quantize'            # 'quantize' | 'teacher' | 'evaluate'
    c.method = method
    c.seed = 0
    c.num_seeds = 1                # independent generator/student pairs trained in one program
    # Hyperparameter sweep (bag_jax.sweep): {dotted field: values}, e.g.
    # {'loss.channel_attention': (0.0, 5.0)}; every point runs num_seeds seeds, all in one program.
    # From the command line: '--config.sweep={"loss.channel_attention": [0, 5]}'.
    c.sweep = config_dict.placeholder(object)
    # Devices per run when several runs share the devices (unset: all devices for one run, else as
    # few as the batch needs, so that the runs spread over the devices first).
    c.data_parallel = config_dict.placeholder(int)

    # Schedule (docs/algorithms.md 5.1): 400 epochs x 200 iterations; the student is frozen for the first
    # warmup_epochs while only the generator trains; activation ranges calibrate during the first
    # calibration_epochs (hard-coded 4 in the reference) and are frozen afterwards.
    pool_method = method in ('hast', 'synq')
    c.batch_size = 200 if method == 'gdfq' else 16   # the pool methods' generator calibrates at 16
    c.epochs = {'hast': 151, 'synq': 100}.get(method, 400)
    c.iters_per_epoch = 200
    c.warmup_epochs = 4
    c.calibration_epochs = 4
    # 'lp': when calibration ends, each activation range becomes the one minimising the L_p
    # (p = 2.4) error over range_clip_batches generator batches (SynQ's unused search, static
    # and per tensor like the rest); 'none': the calibrated ranges as they are.
    c.range_clip = 'lp' if method == 'bag_synq' else 'none'
    c.range_clip_batches = 4
    c.lr_milestones = (20, 40, 60) if pool_method else (100, 200, 300)  # both learning rates times lr_decay
    c.lr_decay = 0.1
    c.eval_batch_size = 200
    # 'scan': an epoch is one compiled loop; 'python': one compiled iteration called per step;
    # 'auto': 'python' on CPU (XLA:CPU is slow at convolutions inside loops), else 'scan'.
    c.epoch_loop = 'auto'
    c.image_grid_every = 10        # epochs between PNG grids of generated images (0: never)
    c.log_every = 1                # epochs between metric lines

    c.quant = ml_collections.ConfigDict()
    c.quant.w_bits = 3             # 1..16, or 32 for full precision
    c.quant.a_bits = 3
    c.quant.range_rule = 'reference'   # 'reference' (QuantAct's formula, docs/algorithms.md 2.4) | 'ema'
    c.quant.ste = 'identity'           # 'identity' (reference) | 'clipped'

    c.generator = ml_collections.ConfigDict()
    c.generator.latent_dim = 100
    c.generator.lr = 1e-3
    c.generator.b1 = 0.5
    c.generator.b2 = 0.999
    c.generator.quantize = method in ('bag', 'bag_synq')      # BAG: weights at quant.w_bits (docs/algorithms.md 8.2a)
    c.generator.quantize_activations = False    # also LeakyReLU outputs at quant.a_bits
    # How the generator sees the label: 'embedding' (CIFAR: z times a label embedding) or
    # 'batchnorm' (ImageNet: class-conditional BatchNorm, docs/imagenet.md 3).
    c.generator.conditioning = 'embedding'

    c.student = ml_collections.ConfigDict()
    c.student.lr = 1e-5 if pool_method else 1e-4
    c.student.momentum = 0.9
    c.student.nesterov = True
    c.student.weight_decay = 1e-4  # coupled, as PyTorch's SGD (docs/algorithms.md 9.15)

    c.loss = ml_collections.ConfigDict()
    c.loss.bns = 0.1 if method in ('gdfq', 'hast', 'synq') else 1.0   # GDFQ 0.1, AdaDFQ gamma = 1
    c.loss.temperature = 20.0
    c.loss.kd = 20.0 if pool_method else 1.0   # GDFQ's alpha; HAST's and SynQ's alpha (20)
    c.loss.alpha_ds = 0.2
    c.loss.alpha_as = 0.1
    c.loss.lambda_l = 0.1
    c.loss.lambda_u = 0.8
    c.loss.balance = 1.0           # AdaDFQ beta
    # Channel-attention distillation weight mu (0 = off). The paper does not give it. On the
    # digits demo AT's beta/2 = 500 (docs/algorithms.md 8.2b) made the student diverge within 30 fine-tuning
    # iterations and 50 within 3 epochs: there the attention term's gradient was 25x that of
    # L_Q (whose variable part is only ~1/2 Var(t - s)) at mu = 50. mu = 5 keeps the two
    # comparable. Sweep it on CIFAR-100 before trusting it.
    # HAST's and SynQ's feature alignment is the same term on the same layers, 'energy_mean'
    # (the MSE over batch and channels), lambda = 1000.
    c.loss.channel_attention = {'bag': 5.0, 'bag_synq': 5.0, 'hast': 1000.0, 'synq': 1000.0}.get(method, 0.0)
    c.loss.channel_attention_form = 'energy_mean' if pool_method else 'energy'   # | 'mean' | 'softmax'
    c.loss.channel_attention_layers = 'branch'  # 'branch' | 'conv' | 'unit_out' | 'stage_out'
    # Student terms of HAST and SynQ (docs/algorithms.md 10), for any method; 0 switches one off.
    # Selective cross-entropy with the generator's (or pool's) labels where the teacher's
    # p(y) > 1 - selce_tau (SynQ: lambda_CE 5, tau 0.5).
    c.loss.selce = {'synq': 5.0, 'bag_synq': 0.5}.get(method, 0.0)
    c.loss.selce_tau = 0.5
    # Grad-CAM alignment of the last convolution, MSE of the min-max normalized maps (SynQ: 200).
    c.loss.cam = {'synq': 200.0, 'bag_synq': 50.0}.get(method, 0.0)
    # The student loss again on x + eps sign(grad_x L_Q), times this weight (HAST, SynQ: 1, eps 0.01).
    c.loss.perturbation = 1.0 if method in ('hast', 'synq', 'bag_synq') else 0.0
    c.loss.perturbation_eps = 0.01
    c.loss.perturbation_features = method != 'synq'   # the perturbed loss keeps channel attention
                                                      # (HAST; SynQ on ImageNet only)

    # The synthetic pool of hast and synq (bag_jax/pool.py): noise optimised on the teacher's BN
    # statistics + focal * mean((1 - p_y)^gamma CE), Adam at lr with ReduceLROnPlateau, in
    # batches; the student then trains on train_batch_size images of it per iteration, augmented
    # (random resized crop and flip) and, where low_pass > 0, low-pass filtered (SynQ's D0).
    c.pool = ml_collections.ConfigDict()
    c.pool.size = 5120
    c.pool.batch_size = 256
    c.pool.steps = 1000
    c.pool.lr = 0.5
    c.pool.focal = 10.0
    c.pool.gamma = 2.0
    c.pool.train_batch_size = 256 if method == 'synq' else 64
    c.pool.augment = 'resized_crop_flip'   # | 'none' | 'crop_flip'
    c.pool.low_pass = 80.0 if method == 'synq' else 0.0

    c.data = ml_collections.ConfigDict()
    c.data.name = 'cifar100'       # 'cifar100' | 'cifar10' | 'digits' | 'npz' | 'imagenet2012' | 'imagefolder'
    c.data.npz_path = config_dict.placeholder(str)
    c.data.tfds_dir = config_dict.placeholder(str)
    c.data.digits_test_fraction = 0.25   # digits only: the share of the 1797 images held out for testing
    # imagefolder only: one subfolder of images per class (ImageNet: val/n01440764/*.JPEG, ...).
    c.data.imagefolder_dir = config_dict.placeholder(str)
    # imagenet2012, imagefolder: the side of the center crop; the shorter side is first resized to
    # round(image_size * 256 / 224) (Resize(256) -> CenterCrop(224), docs/imagenet.md 6).
    c.data.image_size = 224

    c.teacher = ml_collections.ConfigDict()
    c.teacher.checkpoint = config_dict.placeholder(str)   # empty: train one into workdir/teacher
    c.teacher.depth = 20
    # Full-precision training, used when no checkpoint is given (see configs/cifar100_teacher.py).
    c.teacher.epochs = 200
    c.teacher.batch_size = 128
    c.teacher.lr = 0.1
    c.teacher.momentum = 0.9
    c.teacher.weight_decay = 5e-4
    c.teacher.label_smoothing = 0.0
    return c
