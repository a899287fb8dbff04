"""Specialized fine-tuning of a CoDe pair (the paper's Sec. 3.3; the reference never released it):
the drafter learns the small scales, the refiner distils a large VAR on the large ones.

    torchrun --nproc_per_node=8 finetune_CoDe.py --role drafter --draft_steps 8 --data imagenet/train --output_dir runs/drafter_8
    torchrun --nproc_per_node=8 finetune_CoDe.py --role all --data imagenet/train --output_dir runs/refiner_all
    torchrun --nproc_per_node=8 finetune_CoDe.py --role refiner --draft_steps 8 --student_ckpt runs/refiner_all/weights.pth \\
        --data imagenet/train --output_dir runs/refiner_8

VAR's recipe by default (its crops, drop path, schedule and weight decay; the README's table says
where this differs); every step is logged to OUTPUT_DIR/log.jsonl; OUTPUT_DIR/weights.pth loads in
infer_CoDe.py. Rerunning the same command continues from the last saved state.
"""
import os
import sys

from training.data import CROPS
from training.loop import Diverged, check_args, run
from training.losses import ROLES
from training.schedule import SCHEDULES
from utils import distributed
from utils.cli import Parser, main_guard, runtime
from utils.errors import UserError


def parser():
    p = Parser(description=__doc__.split('\n\n')[0])
    g = p.add_argument_group('what to train')
    g.add_argument('--role', choices=ROLES, required=True,
                   help='drafter: scales 0..N-1; refiner: scales N..9 over the full sequence; all: every scale (the refiner\'s first stage)')
    g.add_argument('--draft_steps', type=int, default=8, help='N, the scales the drafter samples, 1-9 (default 8; unused by --role all)')
    g.add_argument('--student_ckpt', default=None, help='the VAR trained (default: var_d30.pth from the hub for the drafter and '
                   'var_d16.pth for --role all; --role refiner needs stage 1\'s weights, or --from_hub)')
    g.add_argument('--from_hub', action='store_true', help='--role refiner: start from the hub\'s VAR-d16, skipping stage 1 on purpose')
    g.add_argument('--teacher_ckpt', default=None, help='frozen VAR whose logits are distilled; "none" for CE alone '
                   '(default: var_d30.pth for refiner and all, none for the drafter)')
    g.add_argument('--vae_ckpt', default=None, help='local VQVAE checkpoint (default: vae_ch160v4096z32.pth from the hub)')
    g = p.add_argument_group('loss')
    g.add_argument('--alpha', type=float, default=0.5, help='weight of the distillation term, in [0, 1] (default 0.5)')
    g.add_argument('--kd_temp', type=float, default=1.0, help='distillation temperature T (default 1)')
    g.add_argument('--label_smooth', type=float, default=0.0, help='label smoothing of the cross-entropy (default 0, as VAR)')
    g.add_argument('--cond_drop', type=float, default=0.1, help='probability that an image trains as "no class", for guidance (default 0.1, as VAR)')
    g.add_argument('--drop_path', type=float, default=None, help='stochastic depth of the last block, rising linearly from 0 at the first '
                   '(default 0.1 x depth / 24, as VAR: 0.067 for d16, 0.125 for d30)')
    g = p.add_argument_group('data')
    g.add_argument('--data', required=True, help='ImageFolder tree, one folder of images per class: ImageNet synset folders '
                   '(n01440764, ...) get their ImageNet index; other names need --class_map or one folder per class of the student')
    g.add_argument('--class_map', default=None, help='JSON file: class folder name -> class index (for folders not named by synset)')
    g.add_argument('--crop', choices=CROPS, default='var', help='var: shorter side to 288 (LANCZOS), a fresh random 256 crop per image '
                   'and epoch, encoded on the fly (VAR\'s training); center: the centre crop, encoded once into the token cache '
                   '(VAR\'s validation crop); none: 256x256 files as they are, cached (default var)')
    g.add_argument('--hflip', action='store_true', help='also train on every image mirrored')
    g.add_argument('--token_cache', default=None, help='folder of the encoded tokens (--crop center/none, --val_data), to share '
                   'between runs (default OUTPUT_DIR/token_cache)')
    g.add_argument('--val_data', default=None, help='held-out ImageFolder: per-scale CE and top-1 accuracy every --val_every steps')
    g.add_argument('--val_every', type=int, default=1000, help='default 1000')
    workers = min(4, len(os.sched_getaffinity(0)))  # more than the cores only slows the decode (and torch warns)
    g.add_argument('--workers', type=int, default=workers, help=f'image-decoding processes (default {workers}: 4, at most the cores; 0: none)')
    g.add_argument('--encode_batch_size', type=int, default=64, help='images per VQVAE batch while filling the token cache (default 64)')
    g = p.add_argument_group('optimization (VAR\'s recipe; defaults by the student\'s depth)')
    g.add_argument('--blr', type=float, default=None, help='base learning rate per 256 images: the peak is blr x --batch_size / 256 '
                   '(default 1e-4 up to depth 20, 8e-5 deeper)')
    g.add_argument('--sched', choices=SCHEDULES, default='lin0', help='lin0: flat for 5%% after the warm-up, then linear down to wpe x peak; '
                   'cos: half cosine down to wpe x peak (default lin0)')
    g.add_argument('--warmup', type=int, default=None, help='warm-up steps (default 2%% of --total_steps, VAR\'s ep/50)')
    g.add_argument('--wp0', type=float, default=0.005, help='learning rate at step 0, a fraction of the peak (default 0.005)')
    g.add_argument('--wpe', type=float, default=None, help='learning rate at the last step, a fraction of the peak '
                   '(default 0.1 up to depth 20, 0.01 deeper)')
    g.add_argument('--total_steps', type=int, default=20000, help='length of the schedule (default 20000)')
    g.add_argument('--max_steps', type=int, default=None, help='stop this invocation after this many steps (default --total_steps)')
    g.add_argument('--batch_size', type=int, default=256, help='global batch, split across processes (default 256)')
    g.add_argument('--grad_accum', type=int, default=1, help='micro-batches per step and process (default 1)')
    g.add_argument('--wd', type=float, default=0.05, help='AdamW weight decay at step 0 (default 0.05)')
    g.add_argument('--wd_end', type=float, default=None, help='weight decay at the last step, on a cosine from --wd '
                   '(default --wd, constant; 0.08 from depth 30, as VAR-d30)')
    g.add_argument('--grad_clip', type=float, default=2.0, help='gradient-norm clip, 0 = off (default 2.0)')
    g.add_argument('--seed', type=int, default=0, help='data order, crops, class dropout and drop path (default 0)')
    g = p.add_argument_group('runtime')
    g.add_argument('--output_dir', required=True, help='log.jsonl, state.pth (resumable), weights.pth, settings.json, classes.json')
    g.add_argument('--save_every', type=int, default=1000, help='save the resumable state every this many steps (default 1000)')
    g.add_argument('--max_skips', type=int, default=20, help='stop (exit status 1) after this many non-finite steps in a row (default 20)')
    g.add_argument('--device', default=None, help='cuda, cuda:N or cpu (default: cuda if available)')
    g.add_argument('--dtype', choices=['bf16', 'fp16', 'fp32'], default=None, help='autocast precision; fp16 with loss scaling '
                   '(default bf16 on CUDA, fp32 on CPU)')
    g.add_argument('--fsdp', action='store_true', help='under torchrun: shard parameters, gradients and optimizer state (FSDP2)')
    g.add_argument('--grad_ckpt', action='store_true', help='activation checkpointing per block')
    return p


def main():
    args = parser().parse_args()
    world = int(os.environ.get('WORLD_SIZE', '1'))
    check_args(args, world)
    import torch
    args.device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    args.dtype = args.dtype or ('bf16' if args.device.startswith('cuda') else 'fp32')
    if args.fsdp and world == 1:
        raise UserError('--fsdp shards across processes: run it under torchrun --nproc_per_node=K')
    device, dtype = runtime(args)
    rank, world, device = distributed.setup(device)
    try:
        run(args, rank, world, device, dtype)
    except Diverged as e:  # one line, and not the exit status of bad input
        if rank == 0:
            print(f'{os.path.basename(sys.argv[0])}: stopped: {e}', file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # the saved state is whole (written atomically): say how to go on, no traceback
        print(f'\ninterrupted; rerun the same command to continue from the last saved state in {args.output_dir}', file=sys.stderr)
        sys.exit(130)
    finally:
        distributed.teardown()


if __name__ == '__main__':
    main_guard(main)
