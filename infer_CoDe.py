"""CoDe: a large VAR (the drafter) samples the first --draft_steps scales, a small VAR (the
refiner) takes that token prefix and samples the rest; class-conditional 256x256 ImageNet.

Writes a grid PNG (--output, default output_code.png) and, with --save_npz, the tokens, labels
and images. Prints the time of each repetition and the peak memory, to compare with
infer_original.py.
"""
from utils.checkpoints import describe_schedule, load_code_schedule, load_vae, vae_path
from utils.cli import (CODE_TEMP, Parser, add_code_model_flags, add_output_flags, add_runtime_flags, add_sampling_flags,
                       check_sampling, main_guard, runtime)
from utils.infer import check_outputs, run


def parser():
    p = Parser(description=__doc__.split('\n\n')[0])
    add_code_model_flags(p, draft_steps_max=9)
    add_sampling_flags(p, cfg=4.0, top_k='600', top_p=0.95, temp=CODE_TEMP)
    add_runtime_flags(p)
    add_output_flags(p, 'output_code.png')
    return p


def main():
    args = parser().parse_args()
    check_sampling(args, draft_steps_max=9, hub=not (args.drafter_ckpt and args.refiner_ckpt))
    check_outputs(args)
    device, dtype = runtime(args)
    schedule = load_code_schedule(args, device)
    vae = load_vae(vae_path(args.vae_ckpt), device)
    run(args, schedule, vae, device, dtype, describe_schedule(schedule))

if __name__ == '__main__':
    main_guard(main)
