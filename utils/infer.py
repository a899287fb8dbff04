"""The body infer_original.py and infer_CoDe.py share: time the sampling, report memory, write the outputs."""
import numpy as np
import torch

from models import generate
from models.var import compile_steps, hold_weights_in

from . import io, timing
from .checkpoints import check_agreement
from .cli import autocast, check_labels, check_top_k, check_writable, describe_classes, imagenet_classes
from .errors import UserError


def check_outputs(args):
    io.check_image_path(args.output, '--output')
    check_writable(args.output, '--output')
    if args.save_npz:
        check_writable(args.save_npz, '--save_npz')
    if args.repeats < 1:
        raise UserError(f'--repeats must be >= 1, got {args.repeats}')


def save_outputs(path, tokens, labels, images, num_classes):
    """--save_npz: tokens int32 (B, 680), labels (B,), images uint8 (B, 256, 256, 3) and, for the
    official 1,000 classes, each label's ImageNet name."""
    names = dict(class_names=np.asarray([imagenet_classes()[c] for c in labels])) if num_classes == 1000 else {}
    io.save_npz(path, tokens=tokens.to(torch.int32).cpu().numpy(), labels=np.asarray(labels, dtype=np.int64), images=images, **names)


def prepare(args, schedule, vae, labels, dtype, flag='--class_labels'):
    """What every sampling script does once: the checks that need the loaded models, the weights that autocast
    casts held in its precision (the VAR's linear layers, the VQVAE decoder's convolutions; fp32: unchanged),
    --compile."""
    check_agreement(schedule, vae)  # then every model has the first's classes and the VQVAE's vocabulary
    check_labels(labels, schedule[0].model.num_classes, flag)
    check_top_k(args.top_k, vae.vocab_size)
    vae.hold_decoder_in(dtype)
    for model in {id(stage.model): stage.model for stage in schedule}.values():
        hold_weights_in(model, dtype)
        if args.compile:
            compile_steps(model)


def sample(args, schedule, vae, labels_B, known=None, clock=None, seed=None):
    """One batch as every script samples it, on the device and without a host sync: generate() with args'
    sampling settings (seed: args.seed unless given), then the VQVAE decode. Returns tokens (B, 680) and
    uint8 images (B, 256, 256, 3) on the device. Call under inference_mode and --dtype's autocast (see
    timed). A clock (utils.timing.Clock) is marked before the sampling, between it and the decode, and after."""
    marks = clock.mark if clock else lambda: None
    marks()
    seed = args.seed if seed is None else seed
    tokens, f_hat = generate(schedule, vae, labels_B, seed=seed, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p,
                             temp=args.temp, more_smooth=args.more_smooth, known=known)
    marks()
    images = io.uint8_images(vae.decode(f_hat))
    marks()
    return tokens, images


def timed(device, dtype, work):
    """work(clock), a sample() or inpaint() of one batch, under inference_mode and autocast, synchronised before
    and after (CUDA events or perf_counter, utils.timing). Returns its tokens, its images as a numpy array,
    and the milliseconds of the sampling and of the decode."""
    clock = timing.Clock(device)
    with torch.inference_mode(), autocast(device, dtype):
        clock.synchronize()
        tokens, images = work(clock)
        clock.synchronize()
    return tokens, images.cpu().numpy(), clock.ms(0, 1), clock.ms(1, 2)


def write_outputs(output, npz, tokens, labels, images, num_classes):
    """The grid PNG (8 per row) and, when npz is given, the --save_npz file; images uint8 (B, 256, 256, 3)."""
    io.save_image(io.grid(images), output)
    if npz:
        save_outputs(npz, tokens, labels, images, num_classes)


def run(args, schedule, vae, device, dtype, what):
    """Sample args.class_labels --repeats times (same seed each time, as the reference) and save the last."""
    prepare(args, schedule, vae, args.class_labels, dtype)
    print(f'{what}: batch {len(args.class_labels)}, seed {args.seed}, cfg {args.cfg}, device {device}, {str(dtype).removeprefix("torch.")}')
    print(f'classes: {describe_classes(args.class_labels, schedule[0].model.num_classes)}')
    labels = torch.tensor(args.class_labels, device=device)
    timing.reset_peak_memory(device)
    for r in range(args.repeats):
        tokens, images, sample_ms, decode_ms = timed(device, dtype, lambda clock: sample(args, schedule, vae, labels, clock=clock))
        note = ' (includes compilation)' if args.compile and r == 0 else ''
        print(f'run {r + 1}/{args.repeats}: {sample_ms + decode_ms:.0f} ms for {len(labels)} images (VQVAE decode included){note}')
    mib, kind = timing.peak_memory(device)
    print(f'peak memory: {mib:.0f} MiB ({kind})')
    write_outputs(args.output, args.save_npz, tokens, args.class_labels, images, schedule[0].model.num_classes)
    print(f'images saved to {args.output}')
    if args.save_npz:
        print(f'tokens, labels and images saved to {args.save_npz}')
