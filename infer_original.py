"""Plain VAR: sample class-conditional 256x256 ImageNet images with one model over all 10 scales.

Writes a grid PNG (--output, default output_original.png) and, with --save_npz, the tokens,
labels and images. Prints the time of each repetition and the peak memory, to compare with
infer_CoDe.py.
"""
from models import Stage
from utils.checkpoints import expected_depth, load_vae, load_var, vae_path, var_path
from utils.cli import Parser, add_output_flags, add_runtime_flags, add_sampling_flags, check_sampling, main_guard, runtime
from utils.errors import UserError
from utils.infer import check_outputs, run


def parser():
    p = Parser(description=__doc__.split('\n\n')[0])
    p.add_argument('--model_depth', type=int, default=None, help='VAR depth, 16/20/24/30 (default 30; with --var_ckpt, the file\'s)')
    p.add_argument('--var_ckpt', default=None, help='local VAR checkpoint (default: var_d{depth}.pth from the hub)')
    add_sampling_flags(p, cfg=4.0, top_k='900', top_p=0.95)
    add_runtime_flags(p)
    add_output_flags(p, 'output_original.png')
    return p


def main():
    args = parser().parse_args()
    if len(args.top_k) != 1:
        raise UserError('--top_k takes one value here')
    check_sampling(args, hub=not args.var_ckpt)
    check_outputs(args)
    device, dtype = runtime(args)
    depth = expected_depth(args.model_depth, args.var_ckpt, 30)
    var = load_var(var_path(args.var_ckpt, depth, '--var_ckpt'), device, '--model_depth', depth)
    vae = load_vae(vae_path(args.vae_ckpt), device)
    run(args, [Stage(var, len(var.patch_nums))], vae, device, dtype, f'VAR-d{var.depth}')


if __name__ == '__main__':
    main_guard(main)
