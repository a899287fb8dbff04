"""Command-line flags shared by the scripts, validated so that bad input gets one line and exit 2."""
import argparse
import difflib
import os
import re
import sys
import tempfile

import torch

from .errors import UserError, one_line

NUM_SCALES = 10
DEFAULT_LABELS = '992,992,483,483,970,970,609,609,978,978,985,985,963,963,949,949'
CODE_TOP_K = '600'
CODE_TEMP = ','.join(['1.1'] * 7 + ['1.0'] * 3)
TWO_MODEL_FLAGS = ('drafter_depth', 'refiner_depth', 'draft_steps', 'training_free', 'drafter_ckpt', 'refiner_ckpt')
REQUIRED = object()  # add_sampling_flags(labels=REQUIRED): --class_labels has no default
DTYPES = {'fp16': torch.float16, 'bf16': torch.bfloat16, 'fp32': torch.float32}


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints the usage too; one line is enough
        self.exit(2, f'{self.prog}: error: {message}\n')

    def parse_known_args(self, args=None, namespace=None):
        """argparse takes '--box -10,0,20,20' for a flag without its value ('-10,...' looks like an
        option); a value starting with a minus and a digit after a flag that takes one is that flag's."""
        args = list(sys.argv[1:] if args is None else args)
        takes_value = {o for a in self._actions if a.nargs is None for o in a.option_strings}
        for i in range(len(args) - 1):
            if args[i] in takes_value and re.match(r'-\.?\d', args[i + 1]):
                args[i:i + 2] = [f'{args[i]}={args[i + 1]}', None]
        return super().parse_known_args([a for a in args if a is not None], namespace)


def main_guard(main):
    """Run main(); a UserError becomes one line on stderr and exit status 2, Ctrl-C one line (with what
    main kept, when its KeyboardInterrupt says) and exit status 130, the shell's for SIGINT."""
    try:
        main()
    except UserError as e:
        print(f'{os.path.basename(sys.argv[0])}: error: {e}', file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        print(f'{os.path.basename(sys.argv[0])}: interrupted{f"; {e}" if str(e) else ""}', file=sys.stderr)
        sys.exit(130)


def comma_list(kind, name):
    def parse(text):
        values = [v.strip() for v in text.split(',')]
        if '' in values:  # '1,,2' is a typo, not '1,2'
            raise argparse.ArgumentTypeError(f'{name} has an empty entry in {text!r}')
        try:
            return [kind(v) for v in values]
        except ValueError:
            raise argparse.ArgumentTypeError(f'{name} takes comma-separated {kind.__name__}s, got {text!r}') from None
    return parse


def imagenet_classes():
    """The 1,000 ImageNet category names in class order, from torchvision's weight metadata (no download)."""
    from torchvision.models import ResNet50_Weights
    return ResNet50_Weights.IMAGENET1K_V1.meta['categories']


def class_index(text):
    """A class number, or an ImageNet category name matched case-insensitively ('golden retriever')."""
    try:
        return int(text)
    except ValueError:
        pass
    names = imagenet_classes()
    key = ' '.join(text.lower().split())
    exact = [i for i, name in enumerate(names) if name.lower() == key]
    if exact:
        return exact[0]
    containing = [name for name in names if key in name.lower()]
    if len(containing) == 1:  # 'golden' names one class: take it
        return names.index(containing[0])
    if containing:
        raise argparse.ArgumentTypeError(f'class name {text!r} is ambiguous: {len(containing)} names contain it '
                                         f'({", ".join(containing[:6])}{", ..." if len(containing) > 6 else ""})')
    lower = {name.lower(): name for name in names}
    close = [lower[n] for n in difflib.get_close_matches(key, list(lower), n=5, cutoff=0.5)]
    raise argparse.ArgumentTypeError(f'unknown ImageNet class name {text!r}' + (f'; closest: {", ".join(close)}' if close else ''))


def describe_classes(labels, num_classes):
    """'207 golden retriever, 281 tabby' for the official 1,000 classes; the numbers otherwise."""
    names = imagenet_classes() if num_classes == 1000 else None
    return ', '.join(f'{c} {names[c]}' if names else str(c) for c in labels)


def per_scale(values, flag):
    """One value for every scale, or one per scale."""
    if len(values) == 1:
        return values * NUM_SCALES
    if len(values) != NUM_SCALES:
        raise UserError(f'{flag} takes 1 or {NUM_SCALES} comma-separated values, got {len(values)}')
    return values


def add_sampling_flags(p, cfg, top_k, top_p, temp=None, seed=42, labels=DEFAULT_LABELS):
    """temp=None: no --temp flag (plain VAR has none) and --top_k is one value; else both are per scale.
    labels: the --class_labels default; REQUIRED makes the flag required, None leaves it out."""
    g = p.add_argument_group('sampling')
    names = 'numbers or names, e.g. "golden retriever,tabby,207"'
    if labels is REQUIRED:
        g.add_argument('--class_labels', type=comma_list(class_index, '--class_labels'), required=True,
                       help=f'comma-separated ImageNet classes, {names}, one per image (required)')
    elif labels is not None:
        g.add_argument('--class_labels', type=comma_list(class_index, '--class_labels'), default=labels,
                       help=f'comma-separated ImageNet classes, {names} (default: the reference\'s 16, {labels})')
    g.add_argument('--seed', type=int, default=seed, help=f'seed of the sampling generator (default {seed})')
    g.add_argument('--cfg', type=float, default=cfg, help=f'classifier-free guidance strength, reached at the last scale (default {cfg})')
    g.add_argument('--top_k', type=comma_list(int, '--top_k'), default=top_k,
                   help=f'keep the k most likely tokens, 0 = off; {"one value or 10 (one per scale)" if temp else "one value"} (default {top_k})')
    g.add_argument('--top_p', type=float, default=top_p, help=f'nucleus sampling mass in [0, 1], 0 = off (default {top_p})')
    if temp is not None:
        g.add_argument('--temp', type=comma_list(float, '--temp'), default=temp, help=f'temperature, one value or 10 (default {temp})')
    g.add_argument('--more_smooth', action='store_true', help='Gumbel-softmax smoothing of each scale (visualisation only, not for FID)')


def add_runtime_flags(p):
    g = p.add_argument_group('runtime')
    g.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='cuda, cuda:N or cpu (default: cuda if available)')
    g.add_argument('--dtype', choices=list(DTYPES), default=None, help='autocast precision (default fp16 on CUDA, as the reference; fp32 on CPU)')
    g.add_argument('--vae_ckpt', default=None, help='local VQVAE checkpoint (default: vae_ch160v4096z32.pth from the hub)')
    g.add_argument('--compile', action='store_true', help='capture each scale as a CUDA graph (torch.compile, reduce-overhead); '
                   'the first batch pays the compilation; off on CPU')


def add_code_model_flags(p, draft_steps_max):
    g = p.add_argument_group('models')
    g.add_argument('--drafter_depth', type=int, default=None, help='drafter VAR depth (default 30; with --drafter_ckpt, the file\'s)')
    g.add_argument('--refiner_depth', type=int, default=None, help='refiner VAR depth (default 16; with --refiner_ckpt, the file\'s)')
    g.add_argument('--draft_steps', type=int, default=None,
                   help=f'scales the drafter samples, 1-{draft_steps_max}{" (10 = the drafter alone, plain VAR)" if draft_steps_max == 10 else ""} (default 8)')
    g.add_argument('--training_free', action='store_true', help='use the official VAR weights instead of the fine-tuned CoDe pair')
    g.add_argument('--drafter_ckpt', default=None, help='local drafter checkpoint')
    g.add_argument('--refiner_ckpt', default=None, help='local refiner checkpoint')
    g.add_argument('--schedule', default=None,
                   help='any chain of models instead of the drafter/refiner flags: MODEL:STOP,...,MODEL, e.g. d30:6,d20:8,d16 '
                        '(a hub depth dNN, official VAR weights, or a checkpoint path; each runs the scales before its STOP, '
                        'the last to the end)')


def add_output_flags(p, default_output):
    g = p.add_argument_group('output')
    g.add_argument('--output', default=default_output, help=f'grid of the images, 8 per row (default {default_output})')
    g.add_argument('--save_npz', default=None, help='also save tokens (B, 680), labels (B,) and images (B, 256, 256, 3) uint8')
    g.add_argument('--repeats', type=int, default=3, help='timed repetitions (default 3)')


def check_sampling(args, draft_steps_max=None, hub=False):
    """Range checks of the sampling flags; normalises top_k and temp to one value per scale.
    hub: the models come from the hub, so their 1000 classes are known before any download."""
    args.top_k = per_scale(args.top_k, '--top_k')
    args.temp = per_scale(getattr(args, 'temp', None) or [1.0], '--temp')
    if any(k < 0 for k in args.top_k):
        raise UserError('--top_k must be >= 0 (0 switches it off)')
    if not 0 <= args.top_p <= 1:
        raise UserError(f'--top_p must be in [0, 1], got {args.top_p}')
    if any(t <= 0 for t in args.temp):
        raise UserError('--temp must be > 0')
    if args.cfg < 0:
        raise UserError(f'--cfg must be >= 0, got {args.cfg}')
    if getattr(args, 'schedule', None):
        given = [f for f in TWO_MODEL_FLAGS if getattr(args, f) not in (None, False)]
        if given:
            raise UserError(f'--schedule replaces --{given[0]}; give either the schedule or the drafter/refiner flags')
        from .checkpoints import hub_depth, parse_schedule
        args.stages = parse_schedule(args.schedule)
        hub = hub and all(hub_depth(spec) is not None for spec, _ in args.stages)  # local files may have other classes
    elif draft_steps_max is not None:
        args.draft_steps = 8 if args.draft_steps is None else args.draft_steps
    if draft_steps_max is not None and not args.schedule and not 1 <= args.draft_steps <= draft_steps_max:
        raise UserError(f'--draft_steps must be in 1-{draft_steps_max}, got {args.draft_steps}')
    if hub and getattr(args, 'class_labels', None) is not None:
        check_labels(args.class_labels, 1000)


def check_labels(labels, num_classes, flag='--class_labels'):
    if not labels:
        raise UserError(f'{flag} is empty')
    bad = [c for c in labels if not 0 <= c < num_classes]
    if bad:
        raise UserError(f'{flag}: class {bad[0]} is outside the model\'s classes 0-{num_classes - 1}')


def check_top_k(top_k, vocab_size):
    if max(top_k) > vocab_size:
        raise UserError(f'--top_k {max(top_k)} exceeds the vocabulary size {vocab_size}')


def runtime(args):
    """torch.device and autocast dtype from --device and --dtype."""
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UserError(f'--device: unknown device {args.device!r}') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UserError('--device cuda: no CUDA GPU is available (use --device cpu)')
    if device.type == 'cuda' and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f'--device {args.device}: only {torch.cuda.device_count()} GPU(s)')
    if device.type not in ('cuda', 'cpu'):
        raise UserError(f'--device {args.device}: only cuda and cpu are supported')
    dtype = DTYPES[args.dtype or ('fp16' if device.type == 'cuda' else 'fp32')]
    if device.type == 'cpu' and dtype == torch.float16:  # emulated: the VQVAE decode measured about 70x slower than fp32
        raise UserError('--dtype fp16 is for GPUs; on the CPU use fp32 (the default) or bf16 (also far slower than fp32 on most CPUs)')
    if getattr(args, 'compile', False) and device.type != 'cuda':
        print('note: --compile is off on CPU (it captures CUDA graphs); running eagerly')
        args.compile = False
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = dtype != torch.float32  # as the reference in half precision; exact in fp32
        torch.backends.cudnn.allow_tf32 = dtype != torch.float32
    return device, dtype


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def check_writable(path, flag):
    """Fail before sampling, not after, when an output cannot be written."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UserError(f'{flag} {path} is a folder; give a file name')
    if not os.path.isdir(folder):
        raise UserError(f'{flag} {path}: folder {folder} does not exist')
    check_folder_writable(folder, f'{flag} {path}')


def check_folder_writable(folder, what):
    """A real write, since permission bits do not tell (root passes os.access where nothing can be written, as in /proc)."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix='.write-test-'):
            pass
    except OSError as e:
        raise UserError(f'{what}: cannot write in {folder} ({one_line(e)})') from None
