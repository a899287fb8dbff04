"""Sample images for FID: --images_per_class images of every class into DIR.npz (`arr_0`, uint8,
N x 256 x 256 x 3, class-major; `labels`; `tokens`), the input of OpenAI's guided-diffusion evaluator.

    python sample_CoDe.py --output_path samples/code_n8                  # 50,000 images, CoDe N=8
    torchrun --nproc_per_node=8 sample_CoDe.py --output_path samples/code_n8
    python sample_CoDe.py --draft_steps 10 --top_k 900 --temp 1.0 --output_path samples/var_d30

Work happens in DIR/: every finished batch is saved there at once, so a crashed, killed or interrupted
run, rerun with the same command, continues where it stopped, and a finished one says so and samples
nothing. DIR/manifest.json keeps what the samples depend on (the settings, the weights' digest, the
device type and precision) and refuses a rerun that changes them. Seeds: image j of every class is
sampled by a generator seeded with seed + j; a batch holds image j of up to --batch_size consecutive
classes. With --batch_size 1 and --seed 0 this is the reference sample_CoDe.py's procedure exactly.
"""
import os
import queue
import shutil
import threading
import time

import numpy as np
import torch

from utils import distributed, io, timing
from utils.checkpoints import describe_schedule, load_code_schedule, load_vae, vae_path, weights_digest
from utils.cli import (CODE_TEMP, Parser, add_code_model_flags, add_runtime_flags, add_sampling_flags, autocast, check_folder_writable,
                       check_labels, check_sampling, main_guard, runtime)
from utils.errors import UserError, one_line
from utils.infer import prepare
from utils.infer import sample as sample_one  # sample() is this script's own loop

IMAGE_BYTES = 256 * 256 * 3


def parser():
    p = Parser(description=__doc__.split('\n\n')[0])
    add_code_model_flags(p, draft_steps_max=10)
    add_sampling_flags(p, cfg=1.5, top_k='600', top_p=0.96, temp=CODE_TEMP, seed=0, labels=None)
    add_runtime_flags(p)
    g = p.add_argument_group('output')
    g.add_argument('--output_path', required=True, help='work folder DIR; the result is DIR.npz')
    g.add_argument('--images_per_class', type=int, default=50, help='default 50 (50,000 images for 1,000 classes)')
    g.add_argument('--classes', default='0-999', help='a range A-B (inclusive) or a comma list (default 0-999)')
    g.add_argument('--batch_size', type=int, default=32, help='images per batch (default 32); part of what the samples depend on')
    g.add_argument('--save_png', action='store_true', help='also write DIR/{class}_{j}.png')
    return p


def parse_classes(text):
    try:
        if '-' in text.strip()[1:]:
            a, b = text.split('-')
            classes = list(range(int(a), int(b) + 1))
        else:
            classes = [int(c) for c in text.split(',')]  # '1,,2' is refused, not read as '1,2'
    except ValueError:
        raise UserError(f'--classes takes a range A-B or a comma list of ints, got {text!r}') from None
    if not classes:
        raise UserError(f'--classes {text!r} selects no class')
    if len(set(classes)) != len(classes):
        raise UserError('--classes lists a class twice')
    return classes


def plan(classes, n, batch_size):
    """Batches of (j, classes): image j of up to batch_size consecutive classes, j-major."""
    return [(j, classes[i:i + batch_size]) for j in range(n) for i in range(0, len(classes), batch_size)]


def batch_name(j, first_class):
    return f'{j:05d}_{first_class:05d}'


def output_paths(text):
    """(DIR, DIR.npz) for --output_path, refused before any model is loaded when they cannot be written."""
    name = os.path.basename(text.rstrip('/'))
    if name in ('', '.', '..'):  # '.' would put the npz beside the current folder, as ../NAME.npz
        raise UserError(f'--output_path {text}: name a work folder, e.g. samples/run (the result is then samples/run.npz)')
    folder = os.path.abspath(text.rstrip('/'))
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f'--output_path {text} is a file; name a work folder (the result is FOLDER.npz beside it)')
    check_folder_writable(os.path.dirname(folder), f'--output_path {text}')
    npz_path = folder + '.npz'
    if os.path.exists(npz_path) and not os.path.exists(os.path.join(folder, 'manifest.json')):
        raise UserError(f'{npz_path} exists, but not {folder}/manifest.json, which says how it was made; '
                        'move it away or use another --output_path')
    return folder, npz_path


def manifest_of(args, schedule, vae, dtype, device):
    """What the samples depend on: the weights' content (not where the files lie), the settings, the batch
    size and seed, and the device type and precision, whose float rounding changes tokens."""
    return dict(
        classes=args.classes, images_per_class=args.images_per_class, batch_size=args.batch_size, seed=args.seed,
        cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, temp=args.temp, more_smooth=args.more_smooth,
        stops=[stage.stop for stage in schedule], weights=weights_digest(*[stage.model for stage in schedule], vae),
        dtype=str(dtype).removeprefix('torch.'), device=device.type)


def check_manifest(folder, manifest):
    """A rerun in DIR must use the settings DIR's samples were made with."""
    rounding = 'the device and precision round differently, which changes the tokens'
    io.check_same_settings(os.path.join(folder, 'manifest.json'), manifest, folder, 'use another --output_path or the same settings',
                           reasons=dict(device=rounding, dtype=rounding))


def create_workdir(folder, manifest):
    path = os.path.join(folder, 'manifest.json')
    os.makedirs(os.path.join(folder, 'batches'), exist_ok=True)
    if not os.path.exists(path):
        io.save_json(path, manifest)


def remove_leftovers(folder, npz_path):
    """The temporary files of a killed run: half-saved batches, manifest and npz (bytes freed)."""
    return (io.remove_temporaries(os.path.join(folder, 'batches')) + io.remove_temporaries(folder, 'manifest.json')
            + io.remove_temporaries(os.path.dirname(npz_path), os.path.basename(npz_path)))


def batch_file(folder, name, kind):
    return os.path.join(folder, 'batches', f'{name}.{kind}.npy')


def done_batches(folder):
    """Batches whose images file exists; it is written last, so its tokens are there too."""
    batches = os.path.join(folder, 'batches')
    return {f.removesuffix('.images.npy') for f in os.listdir(batches) if f.endswith('.images.npy')} if os.path.isdir(batches) else set()


def save_atomic(path, array):
    """The file appears whole or not at all, and on disk (fsync) before it has its name."""
    with io.atomic_path(path) as tmp, open(tmp, 'wb') as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())


class Writer:
    """Saves finished batches on a thread, off the GPU's path; a failed save stops the run with one line."""

    def __init__(self, folder, save_png):
        self.folder, self.save_png = folder, save_png
        self.queue, self.error = queue.Queue(maxsize=4), None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def put(self, name, j, classes, images, tokens):
        if self.error:
            raise self.error
        self.queue.put((name, j, classes, images, tokens))

    def _run(self):
        while (item := self.queue.get()) is not None:
            name, j, classes, images, tokens = item
            try:
                if self.save_png:
                    for c, img in zip(classes, images):
                        io.save_image(img, os.path.join(self.folder, f'{c}_{j}.png'))
                save_atomic(batch_file(self.folder, name, 'tokens'), tokens)
                save_atomic(batch_file(self.folder, name, 'images'), images)  # last: it marks the batch done
            except Exception as e:  # reported on the next put or at close
                self.error = self.error or UserError(f'could not save batch {name} in {self.folder}/batches ({one_line(e)}); '
                                                     'the batches saved before it are kept, rerun the same command to resume')

    def close(self):
        self.queue.put(None)
        self.thread.join()
        if self.error:
            raise self.error


def check_npz(npz_path, classes, n):
    """What is wrong with DIR.npz (None: nothing): shapes, dtypes and labels, class-major, n per class."""
    labels = np.repeat(np.asarray(classes, dtype=np.int64), n)
    try:
        found = [io.npz_array_header(npz_path, k) for k in ('arr_0', 'tokens')]
        saved = np.load(npz_path)['labels']
    except Exception as e:  # a truncated or foreign file
        return f'unreadable: {one_line(e)}'
    want = [((len(labels), 256, 256, 3), np.uint8), ((len(labels), 680), np.int32)]
    if found != want:
        return f'arr_0 and tokens are {found}, expected {want}'
    if not np.array_equal(saved, labels):
        return f'labels are not {n} of each of the {len(classes)} classes in order'
    return None


def assemble(folder, classes, n, batch_size, npz_path):
    """DIR.npz, class-major, streamed from the batch files; checked before it takes its name, so that a
    DIR.npz is always a checked one."""
    def rows(kind):
        for i in range(0, len(classes), batch_size):  # the classes of one batch column, j = 0 .. n-1
            chunk = classes[i:i + batch_size]
            # n files open at a time: an mmap holds its file descriptor
            files = [np.load(batch_file(folder, batch_name(j, chunk[0]), kind), mmap_mode='r') for j in range(n)]
            for row in range(len(chunk)):
                for j in range(n):
                    yield files[j][row:row + 1]

    def check(written):
        problem = check_npz(written, classes, n)
        if problem:
            raise RuntimeError(f'{npz_path} failed its check: {problem}')

    N = len(classes) * n
    io.write_npz_streaming(npz_path, {'arr_0': ((N, 256, 256, 3), np.uint8, rows('images')),
                                      'tokens': ((N, 680), np.int32, rows('tokens')),
                                      'labels': ((N,), np.int64, [np.repeat(np.asarray(classes, dtype=np.int64), n)])}, check)


def check_disk(folder, remaining_images, total_images, save_png):
    """Room for the batches still to sample, their PNGs (at most raw size) and the npz built from them."""
    need = (remaining_images * (2 if save_png else 1) + total_images) * IMAGE_BYTES * 1.02
    free = shutil.disk_usage(folder if os.path.isdir(folder) else os.path.dirname(folder)).free
    if free < need:
        raise UserError(f'{folder}: {io.human_size(free)} free, {io.human_size(need)} needed for the batches and the npz '
                        f'({total_images} images of 256x256{", and their PNGs" if save_png else ""})')


def sample_batch(args, schedule, vae, classes, j, device):
    """Image j of these classes, on the device: uint8 images (B, 256, 256, 3) and int32 tokens (B, 680);
    no host sync. Call under inference_mode and the autocast of --dtype."""
    tokens, images = sample_one(args, schedule, vae, torch.tensor(classes, device=device), seed=args.seed + j)
    return images, tokens.to(torch.int32)


def main():
    args = parser().parse_args()
    args.classes = parse_classes(args.classes)
    check_sampling(args, draft_steps_max=10)
    if not (args.drafter_ckpt or args.refiner_ckpt or args.schedule):  # the official models have 1000 classes: say so before downloading
        check_labels(args.classes, 1000, '--classes')
    if args.images_per_class < 1 or args.batch_size < 1:
        raise UserError('--images_per_class and --batch_size must be >= 1')
    folder, npz_path = output_paths(args.output_path)
    device, dtype = runtime(args)
    rank, world, device = distributed.setup(device)
    try:
        sample(args, folder, npz_path, rank, world, device, dtype)
    except KeyboardInterrupt:  # main_guard prints this on one line
        batches = len(plan(args.classes, args.images_per_class, args.batch_size))
        raise KeyboardInterrupt(f'{len(done_batches(folder))} of {batches} batches are saved in {folder}/batches; '
                                'rerun the same command to resume') from None
    finally:
        distributed.teardown()


def sample(args, folder, npz_path, rank, world, device, dtype):
    say = print if rank == 0 else (lambda *a, **k: None)
    schedule = load_code_schedule(args, device)  # --draft_steps 10: the drafter alone
    vae = load_vae(vae_path(args.vae_ckpt), device)
    manifest = manifest_of(args, schedule, vae, dtype, device)  # the weights as loaded, before prepare casts them
    prepare(args, schedule, vae, args.classes, dtype, '--classes')
    batches = plan(args.classes, args.images_per_class, args.batch_size)
    total = len(args.classes) * args.images_per_class
    check_manifest(folder, manifest)  # every rank checks, so that a refusal stops them all
    if os.path.exists(npz_path):  # finished before, with these settings: never sample it again
        problem = check_npz(npz_path, args.classes, args.images_per_class)
        if problem:
            raise UserError(f'{npz_path} exists but is not this run\'s result ({problem}); move it away and rerun to rebuild it')
        say(f'already done: {npz_path} holds the {total} images of these settings; nothing sampled')
        return
    done = done_batches(folder)
    todo = [(j, chunk) for j, chunk in batches if batch_name(j, chunk[0]) not in done]
    remaining = sum(len(chunk) for _, chunk in todo)
    check_disk(folder, remaining, total, args.save_png)
    if rank == 0:
        create_workdir(folder, manifest)
        freed = remove_leftovers(folder, npz_path)
        if freed:
            say(f'removed {io.human_size(freed)} of half-written files a killed run left in {folder}')
    distributed.barrier()
    say(f'{describe_schedule(schedule)}; {total} images ({len(args.classes)} classes x {args.images_per_class}), batch {args.batch_size}, '
        f'{world} process(es); {total - remaining} already done')
    writer = Writer(folder, args.save_png)
    progress = timing.progress(rank == 0, total=total, initial=total - remaining, unit='img', smoothing=0.05)
    start, sampled = time.perf_counter(), 0
    try:
        with torch.inference_mode(), autocast(device, dtype):
            for j, chunk in todo[rank::world]:  # which process samples a batch does not change it
                images, tokens = sample_batch(args, schedule, vae, chunk, j, device)
                writer.put(batch_name(j, chunk[0]), j, chunk, images.cpu().numpy(), tokens.cpu().numpy())
                sampled += len(chunk)
                progress.update(min(len(chunk) * world, total - progress.n))  # other ranks progress alike
    finally:
        writer.close()
        progress.close()
    sampled = distributed.total(sampled, device)  # what every process sampled; waits for them all
    if rank == 0:
        missing = [batch_name(j, c[0]) for j, c in batches if batch_name(j, c[0]) not in done_batches(folder)]
        if missing:
            raise RuntimeError(f'{len(missing)} batches missing after sampling, e.g. {missing[0]}')
        assemble(folder, args.classes, args.images_per_class, args.batch_size, npz_path)
        wall = time.perf_counter() - start
        say(f'done: {total} images ({sampled} sampled now) in {wall:.1f} s, {sampled / wall:.2f} images/s; {npz_path}')
    # the processes leave together: a gloo process torn down while rank 0 still assembles was seen to abort
    # at exit ('terminate called without an active exception') under load
    distributed.barrier()


if __name__ == '__main__':
    main_guard(main)
