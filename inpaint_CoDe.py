"""Zero-shot inpainting, outpainting and class editing with CoDe (the paper's Fig. 7), or with one
VAR (--draft_steps 10): no training, only the sampling loop with part of the image held fixed.

At every scale, inside the kept region the accumulated features are the input image's own (its
multi-scale encoding), outside they are sampled; the drafter does the first --draft_steps scales
and the refiner the rest, as in plain CoDe sampling.

    python inpaint_CoDe.py --image dog.jpg --class_labels 207 --box 64,64,192,192            # inpainting
    python inpaint_CoDe.py --image dog.jpg --class_labels 207 --box 64,64,192,192 --invert   # outpainting
    python inpaint_CoDe.py --image dog.jpg --class_labels 281 --box 64,64,192,192            # editing: a cat there

Writes a grid (--output, default output_inpaint.png): per image, the input, the input with the
region to regenerate greyed out, and the result.
"""
import numpy as np
import torch

from models.sampling import known_region
from utils import io
from utils.checkpoints import load_code_schedule, load_vae, vae_path
from utils.cli import (CODE_TEMP, REQUIRED, Parser, add_code_model_flags, add_runtime_flags, add_sampling_flags, check_sampling,
                       check_writable, comma_list, describe_classes, main_guard, runtime)
from utils.errors import UserError
from utils.infer import prepare, sample, save_outputs, timed

SIZE = 256


def parser():
    p = Parser(description=__doc__.split('\n\n')[0])
    g = p.add_argument_group('input')
    g.add_argument('--image', nargs='+', required=True, help='image files (any size: shorter side to 256, centre crop)')
    g.add_argument('--box', type=comma_list(int, '--box'), default=None, help='x0,y0,x1,y1 in the 256x256 frame: the region to regenerate')
    g.add_argument('--mask', default=None, help='mask image, white = regenerate (256x256, or the size of the input images)')
    g.add_argument('--invert', action='store_true', help='regenerate outside the region instead (outpainting)')
    add_code_model_flags(p, draft_steps_max=10)
    add_sampling_flags(p, cfg=4.0, top_k='600', top_p=0.95, temp=CODE_TEMP, labels=REQUIRED)
    add_runtime_flags(p)
    g = p.add_argument_group('output')
    g.add_argument('--output', default='output_inpaint.png', help='grid: input, masked input, result, per image (default output_inpaint.png)')
    g.add_argument('--save_npz', default=None, help='also save tokens (B, 680), labels (B,) and images (B, 256, 256, 3) uint8')
    return p


def regenerate_region(args, image_sizes):
    """bool (256, 256): True where new content is sampled."""
    if (args.box is None) == (args.mask is None):
        raise UserError('give exactly one of --box and --mask')
    if args.box is not None:
        if len(args.box) != 4:
            raise UserError(f'--box takes x0,y0,x1,y1, got {len(args.box)} values')
        x0, y0, x1, y1 = args.box
        if not (0 <= x0 < x1 <= SIZE and 0 <= y0 < y1 <= SIZE):
            raise UserError(f'--box {x0},{y0},{x1},{y1} is empty or leaves the {SIZE}x{SIZE} frame')
        region = np.zeros((SIZE, SIZE), dtype=bool)
        region[y0:y1, x0:x1] = True
    else:
        region = io.load_mask(args.mask, image_sizes, SIZE)
    return finish_region(region, args.invert)


def finish_region(region, invert):
    """The region to regenerate, inverted for outpainting; neither empty nor the whole image."""
    region = ~region if invert else region
    if not region.any() or region.all():
        raise UserError('the region to regenerate is empty' if not region.any() else 'the region to regenerate is the whole image')
    return region


def inpaint(args, schedule, vae, images_BHW3, region_HW, labels_B, clock=None):
    """Sample the region (True = regenerate) of uint8 images on the device, one label each; returns the tokens
    and the uint8 results on the device, without a host sync. Call under inference_mode and the autocast of
    --dtype (see utils.infer.timed); clock as utils.infer.sample's."""
    x = images_BHW3.permute(0, 3, 1, 2).float() / 255 * 2 - 1
    regenerate = region_HW[None, None].expand(len(images_BHW3), 1, SIZE, SIZE)
    return sample(args, schedule, vae, labels_B, known=known_region(vae, x, regenerate), clock=clock)


def inpaint_images(args, schedule, vae, images, region, labels, device, dtype, flag='--class_labels'):
    """What inpaint_CoDe.py (and demo_CoDe.py's Edit tab) does with loaded models: images uint8 (B, 256, 256, 3),
    region bool (256, 256) True where sampled, one label each. Returns tokens (B, 680), the masked inputs and
    the results (uint8 (B, 256, 256, 3)), and the milliseconds of the sampling and of the decode."""
    prepare(args, schedule, vae, labels, dtype, flag)
    images_BHW3, region_HW = torch.from_numpy(images).to(device), torch.from_numpy(region).to(device)
    labels_B = torch.tensor(labels, device=device)
    tokens, result, sample_ms, decode_ms = timed(device, dtype, lambda clock: inpaint(args, schedule, vae, images_BHW3, region_HW,
                                                                                      labels_B, clock))
    masked = np.where(region[None, :, :, None], np.uint8(128), images)
    return tokens, masked, result, sample_ms, decode_ms


def write_outputs(output, npz, images, masked, result, tokens, labels, num_classes):
    """The grid (per image: input, masked input, result) and, when npz is given, the --save_npz file."""
    io.save_image(io.grid(np.stack([t for triple in zip(images, masked, result) for t in triple]), nrow=3), output)
    if npz:
        save_outputs(npz, tokens, labels, result, num_classes)


def main():
    args = parser().parse_args()
    if len(args.class_labels) != len(args.image):
        raise UserError(f'--class_labels needs one class per image: {len(args.image)} image(s), {len(args.class_labels)} label(s)')
    check_sampling(args, draft_steps_max=10, hub=not (args.drafter_ckpt or args.refiner_ckpt))
    loaded = [io.load_image(path, SIZE) for path in args.image]
    images = np.stack([img for img, _ in loaded])
    region = regenerate_region(args, [size for _, size in loaded])
    io.check_image_path(args.output, '--output')
    check_writable(args.output, '--output')
    if args.save_npz:
        check_writable(args.save_npz, '--save_npz')
    device, dtype = runtime(args)
    schedule = load_code_schedule(args, device)
    vae = load_vae(vae_path(args.vae_ckpt), device)
    tokens, masked, result, _, _ = inpaint_images(args, schedule, vae, images, region, args.class_labels, device, dtype)
    num_classes = schedule[0].model.num_classes
    write_outputs(args.output, args.save_npz, images, masked, result, tokens, args.class_labels, num_classes)
    print(f'{len(images)} image(s), classes {describe_classes(args.class_labels, num_classes)}: '
          f'input, masked input and result saved to {args.output}')
    if args.save_npz:
        print(f'tokens, labels and images saved to {args.save_npz}')


if __name__ == '__main__':
    main_guard(main)
