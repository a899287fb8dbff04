"""A local web demo: CoDe and VAR side by side with their time and memory (tab Generate), and zero-shot
inpainting, outpainting and class editing by painting the region to regenerate (tab Edit).

    python demo_CoDe.py                                  # the fine-tuned CoDe pair (N=8) beside VAR-d30, http://127.0.0.1:7860
    python demo_CoDe.py --training_free                  # official VAR-d30 and VAR-d16: any N; VAR is the drafter itself
    python demo_CoDe.py --drafter_ckpt A.pth --refiner_ckpt B.pth --vae_ckpt V.pth --port 8080

The models are loaded once and stay on the device; requests take it one at a time. Sampling runs
through the scripts' own functions (utils.infer.sample, inpaint_CoDe.inpaint_images), so a page's images are
the images infer_CoDe.py and inpaint_CoDe.py give for the same settings, and its downloads are their
--save_npz files. The page's settings start at the sampling flags' values.
"""
import argparse
import atexit
import concurrent.futures
import copy
import functools
import os
import shutil
import socket
import tempfile
import traceback

import numpy as np
import torch
from PIL import Image

from inpaint_CoDe import SIZE, finish_region, inpaint_images
from inpaint_CoDe import write_outputs as write_edit_outputs
from models import Stage, code_schedule
from utils import io, timing
from utils.checkpoints import CODE_DRAFTER_DEPTH, describe_schedule, load_code_schedule, load_vae, load_var, vae_path, var_path
from utils.cli import (CODE_TEMP, Parser, add_code_model_flags, add_runtime_flags, add_sampling_flags, check_sampling, class_index,
                       comma_list, imagenet_classes, main_guard, runtime)
from utils.errors import UserError, one_line
from utils.infer import prepare, sample, timed, write_outputs

VAR_ALONE = 10  # the draft-steps value that runs the drafter over all scales: plain VAR
# galleries as tall as their images (Gradio's default keeps 450 px, which leaves most of it blank for a few images)
CSS = '#code-gallery .grid-wrap, #var-gallery .grid-wrap {min-height: 0; max-height: none}'


def parser():
    p = Parser(description=__doc__.split('\n\n')[0])
    add_code_model_flags(p, draft_steps_max=9)
    add_sampling_flags(p, cfg=4.0, top_k='600', top_p=0.95, temp=CODE_TEMP, labels=None)
    add_runtime_flags(p)
    p.add_argument('--var_ckpt', default=None,
                   help='the VAR that "Compare with VAR" runs over all 10 scales (default: the official var_d30.pth from the hub '
                        'when the drafter is the hub\'s fine-tuned one; otherwise the drafter itself, which with --training_free '
                        'is the official VAR)')
    g = p.add_argument_group('server')
    g.add_argument('--host', default='127.0.0.1', help='address to serve on (default 127.0.0.1: this machine only; 0.0.0.0: the network)')
    g.add_argument('--port', type=int, default=7860, help='port (default 7860)')
    g.add_argument('--share', action='store_true', help='also open a temporary public link through gradio.live (off by default)')
    return p


def check_port(host, port):
    """Fail in one line before the models load, not after, when the address cannot be served."""
    if not 1 <= port <= 65535:
        raise UserError(f'--port must be in 1-65535, got {port}')
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise UserError(f'cannot serve on {host}:{port} ({one_line(e)}); choose another --port or --host') from None


def baseline_path(args):
    """The file of the VAR compared with, or None for the drafter itself. The hub's fine-tuned drafter is
    trained for the first scales only: alone it is not VAR-d30, so the official var_d30.pth stands in."""
    if args.var_ckpt or not (args.training_free or args.schedule or args.drafter_ckpt):
        return var_path(args.var_ckpt, CODE_DRAFTER_DEPTH, '--var_ckpt')
    return None


def per_scale_text(values):
    """'600' for ten equal values, else the comma list: how the page shows --top_k and --temp."""
    return str(values[0]) if len(set(values)) == 1 else ','.join(map(str, values))


class Demo:
    """The loaded models and what the page's buttons do. One worker thread runs all model work: requests
    take the device one at a time whatever the web server does, and --compile's CUDA graphs stay on one thread."""

    def __init__(self, args):
        check_sampling(args, draft_steps_max=9, hub=False)
        self.args = args
        self.device, self.dtype = runtime(args)
        self.schedule = load_code_schedule(args, self.device)
        self.vae = load_vae(vae_path(args.vae_ckpt), self.device)
        self.drafter = self.schedule[0].model
        baseline = baseline_path(args)
        self.baseline = self.drafter if baseline is None else load_var(baseline, self.device, '--var_ckpt')
        # the checks that need the models, the weights in --dtype, --compile: once before serving
        prepare(args, self.schedule, self.vae, [0], self.dtype)
        prepare(args, self.var(), self.vae, [0], self.dtype)
        # the page's N applies to a drafter/refiner pair; a --schedule is sampled as given
        self.pair = None if args.schedule else (self.drafter, self.schedule[-1].model)
        self.num_classes = self.drafter.num_classes
        names = imagenet_classes() if self.num_classes == 1000 else None
        self.choices = [f'{c} {names[c]}' if names else str(c) for c in range(self.num_classes)]
        self.choice_index = {text: c for c, text in enumerate(self.choices)}
        self.worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix='models')
        self.work = tempfile.mkdtemp(prefix='code-demo-')
        atexit.register(shutil.rmtree, self.work, ignore_errors=True)
        self.requests = 0
        if self.device.type == 'cuda':  # so that the first request's times are not the GPU's start-up
            print('warming up: one image through CoDe and through VAR', flush=True)
            for schedule in (self.code(args), self.var()):
                labels_B = torch.tensor([0], device=self.device)
                self.worker.submit(timed, self.device, self.dtype, lambda clock: sample(args, schedule, self.vae, labels_B, clock=clock)).result()

    # ------------------------------------------------------------------ inputs, checked as the scripts check them

    def labels(self, values):
        """Class numbers from the dropdown: its entries ('207 golden retriever') or typed numbers and names, as --class_labels takes them."""
        labels = []
        for value in values or []:
            if value in self.choice_index:
                labels.append(self.choice_index[value])
                continue
            try:
                labels += comma_list(class_index, 'class')(str(value))
            except argparse.ArgumentTypeError as e:
                raise UserError(str(e)) from None
        if not labels:
            raise UserError('choose at least one class')
        return labels

    def settings(self, steps, seed, cfg, top_k, top_p, temp, more_smooth):
        """The request's copy of the command-line settings, with check_sampling's checks and messages."""
        a = copy.copy(self.args)
        if seed is None or cfg is None or top_p is None or (self.pair and steps is None):
            raise UserError('draft steps, seed, cfg and top_p need a value')
        try:
            a.top_k, a.temp = comma_list(int, '--top_k')(str(top_k)), comma_list(float, '--temp')(str(temp))
        except argparse.ArgumentTypeError as e:
            raise UserError(str(e)) from None
        a.seed, a.cfg, a.top_p, a.more_smooth = int(seed), float(cfg), float(top_p), bool(more_smooth)
        if self.pair:
            a.draft_steps = int(steps)
        check_sampling(a, draft_steps_max=VAR_ALONE if self.pair else None)
        return a

    def code(self, a):
        """CoDe at the page's N (VAR_ALONE: the drafter alone), or the --schedule as given."""
        return code_schedule(*self.pair, a.draft_steps) if self.pair else self.schedule

    def var(self):
        """VAR alone over all 10 scales (see baseline_path), what infer_original.py samples."""
        return [Stage(self.baseline, VAR_ALONE)]

    # ------------------------------------------------------------------ the two buttons

    def folder(self):
        """A fresh folder for this request's downloads; the previous request's files are gone by now
        (the web server copies them when it sends them), so only one request's files stay on disk."""
        for old in os.listdir(self.work):
            shutil.rmtree(os.path.join(self.work, old), ignore_errors=True)
        self.requests += 1
        path = os.path.join(self.work, str(self.requests))
        os.makedirs(path)
        return path

    def measured(self, a, schedule, labels, folder, name):
        """Sample and decode once, timed and measured as infer_*.py do; write the grid and the npz."""
        prepare(a, schedule, self.vae, labels, self.dtype, 'classes')
        timing.reset_peak_memory(self.device)
        labels_B = torch.tensor(labels, device=self.device)
        tokens, images, sample_ms, decode_ms = timed(self.device, self.dtype, lambda clock: sample(a, schedule, self.vae, labels_B, clock=clock))
        mib, kind = timing.peak_memory(self.device)
        kind += ', since the app started' if self.device.type == 'cpu' else ''  # the peak RSS cannot be reset
        files = [os.path.join(folder, f'{name}.png'), os.path.join(folder, f'{name}.npz')]
        write_outputs(*files, tokens, labels, images, self.num_classes)
        stats = (f'**{describe_schedule(schedule)}**  \nsampling {sample_ms:.0f} ms, VQVAE decode {decode_ms:.0f} ms '
                 f'({len(labels)} image{"s" if len(labels) > 1 else ""})  \npeak memory {mib:.0f} MiB ({kind})')
        gallery = [(img, self.choices[c]) for img, c in zip(images, labels)]
        return gallery, stats, files, sample_ms + decode_ms

    def generate(self, classes, steps, compare, seed, cfg, top_k, top_p, temp, more_smooth):
        labels = self.labels(classes)
        a = self.settings(steps, seed, cfg, top_k, top_p, temp, more_smooth)
        folder = self.folder()
        code_gallery, code_stats, code_files, code_ms = self.measured(a, self.code(a), labels, folder, 'code')
        if not compare:
            return code_gallery, code_stats, *code_files, None, '', None, None
        var_gallery, var_stats, var_files, var_ms = self.measured(a, self.var(), labels, folder, 'var')
        code_stats += f'  \n**{var_ms / code_ms:.2f}x the speed of VAR** (sampling and decode)'
        return code_gallery, code_stats, *code_files, var_gallery, var_stats, *var_files

    def edit(self, editor, cls, invert, steps, seed, cfg, top_k, top_p, temp, more_smooth):
        if not editor or editor.get('background') is None:
            raise UserError('upload an image first')
        background = editor['background']
        images = np.stack([io.square_image(background, SIZE)])  # as inpaint_CoDe.py takes image files, once decoded
        painted = np.zeros(background.size[::-1], dtype=np.uint8)
        for layer in editor.get('layers') or []:  # brush strokes: opaque where painted
            if layer.size != background.size:
                raise UserError(f'the painted layer is {layer.size[0]}x{layer.size[1]}, the image {background.size[0]}x{background.size[1]}')
            painted = np.maximum(painted, np.asarray(layer.convert('RGBA'))[..., 3])
        region = io.square_mask(Image.fromarray(painted, 'L'), [background.size], SIZE, 'the painted mask')
        region = finish_region(region, invert)
        labels = self.labels([cls] if cls not in (None, '') else [])
        if len(labels) != 1:
            raise UserError(f'one class for the image, got {len(labels)}')
        a = self.settings(steps, seed, cfg, top_k, top_p, temp, more_smooth)
        schedule = self.code(a)
        tokens, masked, result, sample_ms, decode_ms = inpaint_images(a, schedule, self.vae, images, region, labels, self.device, self.dtype,
                                                               'class')
        folder = self.folder()
        files = [os.path.join(folder, 'edit.png'), os.path.join(folder, 'edit.npz')]
        write_edit_outputs(*files, images, masked, result, tokens, labels, self.num_classes)
        what = 'outpainted around' if invert else 'regenerated'
        stats = (f'**{describe_schedule(schedule)}**  \n{what} the painted region ({region.mean():.0%} of the image) as '
                 f'{self.choices[labels[0]]}  \nsampling {sample_ms:.0f} ms, VQVAE decode {decode_ms:.0f} ms')
        return images[0], masked[0], result[0], stats, *files

    def in_page(self, fn):
        """fn run on the model thread; bad input becomes a message in the page (gr.Error), never a
        traceback, and the server keeps serving."""
        import gradio as gr

        @functools.wraps(fn)
        def handler(*inputs):
            try:
                return self.worker.submit(fn, *inputs).result()
            except UserError as e:
                raise gr.Error(str(e), print_exception=False) from None
            except Exception as e:  # a bug, or out of memory: say what in the page, the traceback in the log
                traceback.print_exc()
                if isinstance(e, torch.cuda.OutOfMemoryError):
                    torch.cuda.empty_cache()
                    raise gr.Error('out of GPU memory: choose fewer classes', print_exception=False) from None
                raise gr.Error(f'failed: {one_line(e)}', print_exception=False) from None
        return handler

    # ------------------------------------------------------------------ the page

    def header(self):
        a, name = self.args, lambda model: os.path.basename(model.source_file)
        models = ', '.join(dict.fromkeys(f'VAR-d{s.model.depth} ({name(s.model)})' for s in self.schedule))
        if self.pair:
            weights = (f'the pair fine-tuned for N={a.draft_steps}, used at every N' if not (a.training_free or a.drafter_ckpt)
                       else 'the same weights at every N')
            steps = f'**N** (draft steps): the drafter samples the first N scales, the refiner the rest ({weights}).'
        else:
            steps = f'**Schedule** as given: {describe_schedule(self.schedule)}.'
        var = (f'**VAR**: VAR-d{self.baseline.depth} alone over all 10 scales ({name(self.baseline)}'
               + (', the drafter itself' if self.baseline is self.drafter else '') + ').')
        compiled = ' With --compile, the first request of each batch size and N includes the compilation.' if a.compile else ''
        return (f'## CoDe: collaborative decoding of VAR\n'
                f'**Models**: {models}, VQVAE ({name(self.vae)}) on {self.device}, {str(self.dtype).removeprefix("torch.")}.  \n'
                f'{steps} {var}  \nTimes and peak memory are measured as infer_CoDe.py measures them.{compiled}')

    def sampling_controls(self):
        """Draft steps, seed, cfg and the rest, starting at the command line's values (one set per tab)."""
        import gradio as gr
        a = self.args
        steps = gr.Radio([(str(n), n) for n in range(1, VAR_ALONE)] + [('VAR alone', VAR_ALONE)], value=a.draft_steps or VAR_ALONE,
                         label='draft steps N', visible=bool(self.pair))
        with gr.Row():
            seed = gr.Number(a.seed, label='seed', precision=0, min_width=80)
            cfg = gr.Number(a.cfg, label='cfg', min_width=80)
        with gr.Accordion('top_k, top_p, temp, more_smooth', open=False):
            top_k = gr.Textbox(per_scale_text(a.top_k), label='top_k (one value or 10, one per scale; 0 = off)')
            top_p = gr.Number(a.top_p, label='top_p (0 = off)', step=0.01)
            temp = gr.Textbox(per_scale_text(a.temp), label='temp (one value or 10, one per scale)')
            more_smooth = gr.Checkbox(a.more_smooth, label='more_smooth (Gumbel-softmax smoothing, for viewing only)')
        return [steps, seed, cfg, top_k, top_p, temp, more_smooth]

    def page(self):
        import gradio as gr

        def downloads(prefix):
            """The grid PNG and the npz as download buttons (a function returns their files' paths)."""
            return [gr.DownloadButton(f'{prefix} {what}'.strip(), size='sm') for what in ('grid PNG', 'npz (tokens, labels, images)')]

        def results(prefix):
            with gr.Column(scale=2, min_width=320):
                gallery = gr.Gallery(label=prefix, columns=2, fit_columns=False, format='png', elem_id=f'{prefix.lower()}-gallery')
                stats = gr.Markdown(label=f'{prefix} times and memory', elem_id=f'{prefix.lower()}-stats', padding=True)
                with gr.Row():
                    buttons = downloads(prefix)
            return [gallery, stats, *buttons]

        # delete_cache: the server's copies of the downloads, hourly, once an hour old
        with gr.Blocks(title='CoDe demo', analytics_enabled=False, delete_cache=(3600, 3600)) as page:
            gr.Markdown(self.header())
            start = [c for c in ('207 golden retriever',) if c in self.choice_index] or self.choices[:1]
            with gr.Tab('Generate'):
                with gr.Row():
                    with gr.Column(scale=1, min_width=280):
                        classes = gr.Dropdown(self.choices, value=start, multiselect=True, allow_custom_value=True, elem_id='classes',
                                              label='classes', info='type to search; a number or a name works too; one image each')
                        controls = self.sampling_controls()
                        compare = gr.Checkbox(True, label='compare with VAR (same seed)')
                        go = gr.Button('Generate', variant='primary')
                    code_outputs, var_outputs = results('CoDe'), results('VAR')  # VAR's stay empty when not compared
                go.click(self.in_page(self.generate), [classes, controls[0], compare, *controls[1:]], code_outputs + var_outputs,
                         api_name='generate', concurrency_id='models', show_progress_on=[code_outputs[0], var_outputs[0]])
            with gr.Tab('Edit'):
                with gr.Row():
                    with gr.Column(scale=1, min_width=280):
                        editor = readable_only(gr.ImageEditor(
                            type='pil', image_mode='RGBA', sources=('upload', 'clipboard'), format='png', layers=False, transforms=(),
                            brush=gr.Brush(colors=['#ff00ff'], color_mode='fixed'), label='image', elem_id='editor'))
                        gr.Markdown('Paint the region to regenerate. The image is resized (shorter side 256) and centre-cropped, '
                                    'as inpaint_CoDe.py does.')
                        cls = gr.Dropdown(self.choices, value=start[0], allow_custom_value=True, label='class of the new content')
                        invert = gr.Checkbox(False, label='outpaint: regenerate outside the painted region')
                        edit_controls = self.sampling_controls()
                        go_edit = gr.Button('Regenerate', variant='primary')
                    with gr.Column(scale=4):
                        with gr.Row():
                            shown = [gr.Image(label=label, format='png', interactive=False, elem_id=f'edit-{i}', min_width=200,
                                              buttons=['download', 'fullscreen'])
                                     for i, label in enumerate(('input (256x256)', 'masked input', 'result'))]
                        edit_stats = gr.Markdown(label='times', elem_id='edit-stats', padding=True)
                        with gr.Row():
                            edit_buttons = downloads('')
                go_edit.click(self.in_page(self.edit), [editor, cls, invert, *edit_controls], [*shown, edit_stats, *edit_buttons],
                              api_name='edit', concurrency_id='models', show_progress_on=shown[2])
        return page.queue(default_concurrency_limit=1)


def readable_only(editor):
    """Gradio decodes an upload before the button's function runs: an image it cannot decode gets the
    scripts' one-line message instead of Gradio's report for developers. (Wrapped on the instance: a
    subclass of a Gradio component makes Gradio write a .pyi file beside this script.)"""
    import gradio as gr
    decode = editor.preprocess

    def preprocess(payload):
        try:
            return decode(payload)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            name = getattr(getattr(payload, 'background', None), 'orig_name', None) or 'the upload'
            raise gr.Error(f'cannot read image {name} ({one_line(e)})', print_exception=False) from None
    editor.preprocess = preprocess
    return editor


def launch(args, block=True):
    """Load the models, build the page and serve it; returns the Gradio app (block=False: at once)."""
    os.environ.setdefault('GRADIO_ANALYTICS_ENABLED', 'False')  # no usage reports from a research machine
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UserError('demo_CoDe.py needs gradio: pip install -r requirements.txt') from None
    check_port(args.host, args.port)
    page = Demo(args).page()
    _, local_url, share_url = page.launch(server_name=args.host, server_port=args.port, share=args.share, prevent_thread_lock=True,
                                          show_error=True, ssr_mode=False, footer_links=['api'], quiet=True, css=CSS)
    print(f'serving on {local_url}{f" and {share_url}" if share_url else ""} (Ctrl-C stops)', flush=True)
    if block:
        page.block_thread()
    return page


def main():
    launch(parser().parse_args())


if __name__ == '__main__':
    main_guard(main)
