"""Specialized fine-tuning of a CoDe pair (the paper's Sec. 3.3; the reference never released it):
the drafter learns the small scales, the refiner distils a large VAR on the large ones.

    torchrun --nproc_per_node=8 finetune_CoDe.py --role drafter --draft_steps 8 --data imagenet/train --output_dir runs/drafter_8
    torchrun --nproc_per_node=8 finetune_CoDe.py --role all --data imagenet/train --output_dir runs/refiner_all
    torchrun --nproc_per_node=8 finetune_CoDe.py --role refiner --draft_steps 8 --student_ckpt runs/refiner_all/weights.pth \\
        --data imagenet/train --output_dir runs/refiner_8

Images are encoded once into multi-scale tokens (a cache in --output_dir, or --token_cache);
every step is logged to OUTPUT_DIR/log.jsonl; OUTPUT_DIR/weights.pth loads in infer_CoDe.py.
Rerunning the same command continues from the last saved state.
"""
import os
import sys

from utils import distributed
from utils.cli import Parser, main_guard, runtime
from utils.errors import UserError
from utils.losses import ROLES
from utils.train import check_args, run


def parser():
    p = Parser(description=__doc__.split('\n\n')[0])
    g = p.add_argument_group('what to train')
    g.add_argument('--role', choices=ROLES, required=True,
                   help='drafter: scales 0..N-1; refiner: scales N..9 over the full sequence; all: every scale (the refiner\'s first stage)')
    g.add_argument('--draft_steps', type=int, default=8, help='N, the scales the drafter samples, 1-9 (default 8; unused by --role all)')
    g.add_argument('--student_ckpt', default=None, help='the VAR trained (default: var_d30.pth from the hub for the drafter, var_d16.pth otherwise)')
    g.add_argument('--teacher_ckpt', default=None, help='frozen VAR whose logits are distilled; "none" for CE alone '
                   '(default: var_d30.pth for refiner and all, none for the drafter)')
    g.add_argument('--vae_ckpt', default=None, help='local VQVAE checkpoint (default: vae_ch160v4096z32.pth from the hub)')
    g = p.add_argument_group('loss')
    g.add_argument('--alpha', type=float, default=0.5, help='weight of the distillation term, in [0, 1] (default 0.5)')
    g.add_argument('--kd_temp', type=float, default=1.0, help='distillation temperature T (default 1)')
    g.add_argument('--label_smooth', type=float, default=0.0, help='label smoothing of the cross-entropy (default 0)')
    g.add_argument('--cond_drop', type=float, default=0.1, help='probability that an image trains as "no class", for guidance (default 0.1)')
    g = p.add_argument_group('data')
    g.add_argument('--data', required=True, help='ImageFolder tree: one folder of images per class, sorted names give labels 0, 1, ...')
    g.add_argument('--hflip', action='store_true', help='also train on every image mirrored (encoded once, cached)')
    g.add_argument('--token_cache', default=None, help='folder of the encoded tokens, to share between runs (default OUTPUT_DIR/token_cache)')
    g.add_argument('--val_data', default=None, help='held-out ImageFolder: per-scale CE and top-1 accuracy every --val_every steps')
    g.add_argument('--val_every', type=int, default=1000, help='default 1000')
    workers = min(4, len(os.sched_getaffinity(0)))  # more than the cores only slows the decode (and torch warns)
    g.add_argument('--workers', type=int, default=workers, help=f'image-decoding processes while encoding (default {workers}: 4, at most the cores)')
    g.add_argument('--encode_batch_size', type=int, default=64, help='images per VQVAE batch while encoding (default 64)')
    g = p.add_argument_group('optimization')
    g.add_argument('--lr', type=float, default=1e-4, help='peak learning rate (default 1e-4)')
    g.add_argument('--min_lr', type=float, default=0.0, help='learning rate at --total_steps (default 0)')
    g.add_argument('--warmup_steps', type=int, default=500, help='linear warm-up steps (default 500)')
    g.add_argument('--total_steps', type=int, default=20000, help='length of the schedule (default 20000)')
    g.add_argument('--max_steps', type=int, default=None, help='stop this invocation after this many steps (default --total_steps)')
    g.add_argument('--batch_size', type=int, default=256, help='global batch, split across processes (default 256)')
    g.add_argument('--grad_accum', type=int, default=1, help='micro-batches per step and process (default 1)')
    g.add_argument('--wd', type=float, default=0.05, help='AdamW weight decay on matrices (default 0.05)')
    g.add_argument('--grad_clip', type=float, default=2.0, help='gradient-norm clip, 0 = off (default 2.0)')
    g.add_argument('--seed', type=int, default=0, help='data order and class dropout (default 0)')
    g = p.add_argument_group('runtime')
    g.add_argument('--output_dir', required=True, help='log.jsonl, state.pth (resumable), weights.pth')
    g.add_argument('--save_every', type=int, default=1000, help='save the resumable state every this many steps (default 1000)')
    g.add_argument('--device', default=None, help='cuda, cuda:N or cpu (default: cuda if available)')
    g.add_argument('--dtype', choices=['bf16', 'fp16', 'fp32'], default=None, help='autocast precision (default bf16 on CUDA, fp32 on CPU)')
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
    except KeyboardInterrupt:  # the saved state is whole (written atomically): say how to go on, no traceback
        print(f'\ninterrupted; rerun the same command to continue from the last saved state in {args.output_dir}', file=sys.stderr)
        sys.exit(130)
    finally:
        distributed.teardown()


if __name__ == '__main__':
    main_guard(main)
