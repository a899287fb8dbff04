"""Checkpoints: download from the Hugging Face hub, read safely, infer the architecture from the
tensors, and load with an exact key-and-shape check.

Official files: FoundationVision/var holds the VQVAE and VAR-d16/20/24/30; Zigeng/VAR_CoDe holds
the fine-tuned CoDe pairs (a d30 drafter and a d16 refiner for 6, 7, 8 and 9 draft steps).
"""
import hashlib
import json
import os
import re
import zipfile

import torch

from models import VAR, VQVAE, Stage, code_schedule
from models.quant import PATCH_NUMS

from .errors import UserError, one_line
from .io import atomic_path, save_json

VAR_REPO, CODE_REPO = 'FoundationVision/var', 'Zigeng/VAR_CoDe'
VAE_FILE = 'vae_ch160v4096z32.pth'
HUB_DEPTHS = (16, 20, 24, 30)
CODE_DRAFTER_DEPTH, CODE_REFINER_DEPTH, CODE_DRAFT_STEPS = 30, 16, (6, 7, 8, 9)


# Approximate sizes of the official files (fp32), to say what a first run is about to fetch
FILE_GB = {VAE_FILE: 0.44, 'var_d16.pth': 1.2, 'var_d20.pth': 2.4, 'var_d24.pth': 4.1, 'var_d30.pth': 8.0}
FILE_GB.update({f'drafter_{n}.pth': 8.0 for n in CODE_DRAFT_STEPS})
FILE_GB.update({f'refiner_{n}.pth': 1.2 for n in CODE_DRAFT_STEPS})


def download(repo_id: str, filename: str, flag: str) -> str:
    """Path of repo_id/filename in the Hugging Face cache, downloading it if needed
    (HF_HUB_OFFLINE, HF_ENDPOINT and HF_HOME are honoured by huggingface_hub)."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.utils import logging as hf_logging
    hf_logging.set_verbosity_error()  # its retry warnings would bury our one-line message
    cached = try_to_load_from_cache(repo_id, filename)
    if isinstance(cached, str):
        return cached
    advice = f'download it yourself and pass its path with {flag}'
    if constants.HF_HUB_OFFLINE:  # say so at once rather than after the hub client's retries
        raise UserError(f'{filename} (Hugging Face repo {repo_id}) is not in the cache and HF_HUB_OFFLINE is set; unset it, or {advice}')
    size = f'about {FILE_GB[filename]:.1f} GB' if filename in FILE_GB else 'size unknown'
    print(f'downloading {filename} ({size}) from the Hugging Face repo {repo_id} into {constants.HF_HUB_CACHE} '
          f'(once; HF_HUB_OFFLINE=1 makes a machine without network fail at once)', flush=True)
    try:
        return hf_hub_download(repo_id=repo_id, filename=filename)
    except Exception as e:  # network, missing file, auth: one message for all
        raise UserError(f'could not get {filename} from the Hugging Face repo {repo_id} ({one_line(e)}); {advice}') from None


def read_state_dict(path: str) -> dict:
    """Tensors of a checkpoint file, never unpickling code (weights_only=True)."""
    if os.path.isdir(path):
        raise UserError(f'{path} is a folder; give the checkpoint file (.pth) itself')
    if not os.path.isfile(path):
        raise UserError(f'checkpoint not found: {path}')
    try:
        # mmap keeps a 8 GB file out of RAM until its tensors are used (zip format only)
        sd = torch.load(path, map_location='cpu', weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:
        raise UserError(f'cannot read {path} as a PyTorch checkpoint ({one_line(e)})') from None
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f'{path} does not hold a state dict of tensors')
    return sd


def _kind(sd):
    if 'quantize.embedding.weight' in sd:
        return 'VQVAE'
    if 'class_emb.weight' in sd:
        return 'VAR'
    return 'unknown'


def _require(sd, path, kind):
    if _kind(sd) != kind:
        found = _kind(sd)
        raise UserError(f'{path} is {"a " + found if found != "unknown" else "not a VAR or VQVAE"} checkpoint, expected a {kind} one')


def var_config(sd: dict, path: str) -> dict:
    """VAR hyperparameters read off the tensors, so that any size loads."""
    try:
        depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r'blocks\.(\d+)\.', k)))
        classes, width = sd['class_emb.weight'].shape
        config = dict(depth=depth, embed_dim=width, num_heads=sd['blocks.0.attn.scale_mul_1H11'].shape[1],
                      num_classes=classes - 1, vocab_size=sd['head.weight'].shape[0], Cvae=sd['word_embed.weight'].shape[1],
                      mlp_ratio=sd['blocks.0.ffn.fc1.weight'].shape[0] / width)
        positions = sd['pos_1LC'].shape[1]
    except (KeyError, ValueError, IndexError) as e:
        raise UserError(f'{path} is not a VAR checkpoint of the official architecture (missing {e})') from None
    if positions != sum(pn * pn for pn in PATCH_NUMS):
        raise UserError(f'{path} has {positions} token positions; only the 256x256 model (680 positions) is supported')
    return config


def vae_config(sd: dict, path: str) -> dict:
    try:
        vocab, Cvae = sd['quantize.embedding.weight'].shape
        ch = sd['encoder.conv_in.weight'].shape[0]
        levels = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r'encoder\.down\.(\d+)\.', k)))
        ch_mult = tuple(sd[f'encoder.down.{i}.block.0.conv1.weight'].shape[0] // ch for i in range(levels))
        share = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r'quantize\.quant_resi\.qresi_ls\.(\d+)\.', k)))
    except (KeyError, ValueError) as e:
        raise UserError(f'{path} is not a VQVAE checkpoint of the official architecture (missing {e})') from None
    return dict(vocab_size=vocab, Cvae=Cvae, ch=ch, ch_mult=ch_mult, share_quant_resi=share)


def layout(model) -> dict:
    """Every key and shape of the model's official checkpoint: its parameters plus the buffers
    the official code saved and this code derives (model.derived_buffer_shapes)."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    shapes.update(model.derived_buffer_shapes())
    return shapes


def load_into(model, sd: dict, path: str):
    """Load sd into model (built on the meta device) after checking keys and shapes exactly.
    The buffers the model derives are checked when the file has them, then dropped explicitly."""
    want, derived = layout(model), model.derived_buffer_shapes()
    have = {k: tuple(v.shape) for k, v in sd.items()}
    # derived buffers may be absent (files saved by this code); present, they must have the official shape
    missing, unexpected = sorted(want.keys() - have.keys() - derived.keys()), sorted(have.keys() - want.keys())
    wrong = sorted(k for k in want.keys() & have.keys() if want[k] != have[k])
    if missing or unexpected or wrong:
        parts = [f'{name}: {", ".join(keys[:3])}{" ..." if len(keys) > 3 else ""}'
                 for name, keys in (('missing', missing), ('unexpected', unexpected), ('wrong shape', wrong)) if keys]
        raise UserError(f'{path} does not match the model it describes ({"; ".join(parts)})')
    model.load_state_dict({k: v for k, v in sd.items() if k not in derived}, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def load_vae(path: str, device) -> VQVAE:
    sd = read_state_dict(path)
    _require(sd, path, 'VQVAE')
    with torch.device('meta'):
        model = VQVAE(**vae_config(sd, path))
    model = load_into(model, sd, path).to(device)
    model.source_file = path  # for cached_digest
    return model


def load_var(path: str, device, depth_flag: str = '--depth', depth=None) -> VAR:
    """A VAR of whatever size the file holds; depth, when given, must agree with it."""
    sd = read_state_dict(path)
    _require(sd, path, 'VAR')
    config = var_config(sd, path)
    if depth is not None and depth != config['depth']:
        raise UserError(f'{depth_flag} {depth} disagrees with {path}, which holds a depth-{config["depth"]} VAR')
    with torch.device('meta'):
        model = VAR(**config)
    model = load_into(model, sd, path).to(device)
    model.source_file = path  # for cached_digest
    return model


def official_var_state_dict(sd: dict, model: VAR) -> dict:
    """sd plus the buffers the official VAR saves and this code derives, so that the file loads in
    the official code as well as here."""
    sd = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    level = model.scale_index(model.L).view(1, -1)
    sd['lvl_1L'] = level
    sd['attn_bias_for_masking'] = torch.where(level.view(-1, 1) >= level, 0.0, -torch.inf).view(1, 1, model.L, model.L)
    sd.update({f'blocks.{i}.attn.zero_k_bias': torch.zeros(model.C) for i in range(model.depth)})
    return sd


def save_var(sd: dict, model: VAR, path: str):
    """A VAR state dict in the official layout, written to a temporary name and renamed when whole."""
    with atomic_path(path) as tmp:
        torch.save(official_var_state_dict(sd, model), tmp)


def vae_path(local):
    return local or download(VAR_REPO, VAE_FILE, '--vae_ckpt')


def expected_depth(flag_value, local, hub_default):
    """The depth a loaded VAR must have: the flag's when given, else the hub default when downloading,
    else whatever a local file holds (None)."""
    if flag_value is not None or local:
        return flag_value
    return hub_default


def check_hub_depth(local, depth, flag):
    if not local and depth not in HUB_DEPTHS:
        raise UserError(f'there is no official VAR of depth {depth} to download (choose from {", ".join(map(str, HUB_DEPTHS))}), '
                        f'or pass a local file with {flag}')


def var_path(local, depth, flag):
    """Local path, or the official var_d{depth}.pth from the hub."""
    check_hub_depth(local, depth, flag)
    return local or download(VAR_REPO, f'var_d{depth}.pth', flag)


def code_paths(drafter_ckpt, refiner_ckpt, drafter_depth, refiner_depth, draft_steps, training_free):
    """Paths of the drafter and refiner. Fine-tuned pairs exist only for a d30 drafter, a d16 refiner and
    6-9 draft steps; any other combination needs --training_free (the official VAR weights) or local
    files. Checked before anything is downloaded."""
    drafter_depth = CODE_DRAFTER_DEPTH if drafter_depth is None else drafter_depth
    refiner_depth = CODE_REFINER_DEPTH if refiner_depth is None else refiner_depth
    if training_free:
        paths = [(drafter_ckpt, drafter_depth, '--drafter_ckpt'), (refiner_ckpt, refiner_depth, '--refiner_ckpt')]
        for p in paths:  # validate both before downloading either
            check_hub_depth(*p)
        return [var_path(*p) for p in paths]
    needs_hub = not (drafter_ckpt and refiner_ckpt)
    if needs_hub and (drafter_depth, refiner_depth) != (CODE_DRAFTER_DEPTH, CODE_REFINER_DEPTH) or \
            needs_hub and draft_steps not in CODE_DRAFT_STEPS:
        raise UserError(f'fine-tuned CoDe weights exist only for a d{CODE_DRAFTER_DEPTH} drafter, a d{CODE_REFINER_DEPTH} refiner '
                        f'and --draft_steps 6-9 (asked: d{drafter_depth}, d{refiner_depth}, {draft_steps}); '
                        f'add --training_free to use the official VAR weights, or pass --drafter_ckpt and --refiner_ckpt')
    return [drafter_ckpt or download(CODE_REPO, f'drafter_{draft_steps}.pth', '--drafter_ckpt'),
            refiner_ckpt or download(CODE_REPO, f'refiner_{draft_steps}.pth', '--refiner_ckpt')]


def load_code_models(args, device):
    """(drafter, refiner) from the CoDe flags; refiner is None when --draft_steps is 10 (the
    drafter alone: plain VAR, whose weights are the official var_d{depth}.pth)."""
    drafter_depth = expected_depth(args.drafter_depth, args.drafter_ckpt, CODE_DRAFTER_DEPTH)
    if args.draft_steps >= 10:
        return load_var(var_path(args.drafter_ckpt, drafter_depth, '--drafter_ckpt'), device, '--drafter_depth', drafter_depth), None
    refiner_depth = expected_depth(args.refiner_depth, args.refiner_ckpt, CODE_REFINER_DEPTH)
    drafter_file, refiner_file = code_paths(args.drafter_ckpt, args.refiner_ckpt, args.drafter_depth, args.refiner_depth,
                                            args.draft_steps, args.training_free)
    return (load_var(drafter_file, device, '--drafter_depth', drafter_depth),
            load_var(refiner_file, device, '--refiner_depth', refiner_depth))


# ----------------------------------------------------------------------------- --schedule: any chain of models

def hub_depth(spec: str):
    """The depth a schedule entry names ('d30' -> 30), or None for a checkpoint path."""
    match = re.fullmatch(r'd(\d+)', spec)
    return int(match.group(1)) if match else None


def parse_schedule(text: str, num_scales: int = 10, hub: bool = True):
    """'d30:6,d20:8,d16' -> [('d30', 6), ('d20', 8), ('d16', 10)]: each model (a hub depth dNN or a
    checkpoint path) with the scale it stops before; the last one runs to the end. Checked before
    anything is downloaded."""
    entries = [e.strip() for e in text.split(',')]
    if '' in entries:
        raise UserError(f'--schedule has an empty entry in {text!r}')
    stages = []
    for i, entry in enumerate(entries):
        model, sep, stop = entry.rpartition(':')
        if not (sep and stop.isdigit()):
            model, stop = entry, None
        last = i == len(entries) - 1
        if stop is None and not last:
            raise UserError(f'--schedule: {entry!r} needs the scale it stops before, MODEL:STOP (only the last model runs to the end)')
        if stop is not None and last:
            raise UserError(f'--schedule: the last model runs to the end; write {model!r} without :{stop}')
        if hub and hub_depth(model) is not None:  # hub=False: depths name random-weight models (benchmark.py)
            check_hub_depth(None, hub_depth(model), '--schedule')
        stages.append((model, num_scales if last else int(stop)))
    stops = [stop for _, stop in stages[:-1]]
    if any(not 1 <= s < num_scales for s in stops) or stops != sorted(set(stops)):
        raise UserError(f'--schedule: the stops {",".join(map(str, stops))} must increase strictly within 1-{num_scales - 1}')
    return stages


def load_schedule(stages, device):
    """The models of a parsed schedule as [(VAR, stop), ...]; a model named twice is loaded once
    (check_agreement then checks that they fit together)."""
    models = {}
    for spec, _ in stages:
        if spec not in models:
            depth = hub_depth(spec)
            models[spec] = load_var(spec if depth is None else var_path(None, depth, '--schedule'), device, '--schedule')
    return [(models[spec], stop) for spec, stop in stages]


# what a schedule's models and the VQVAE must share: they hand token maps (vocabulary, scales) and
# VQVAE features (latent width) to each other, and every model embeds the same class labels
AGREEMENT = (('vocab_size', 'vocab_size (tokens)'), ('Cvae', 'Cvae (latent width)'), ('patch_nums', 'patch_nums (scales)'),
             ('num_classes', 'num_classes'))


def model_name(model, role):
    """'the refiner (refiner_8.pth)': a role and, for a loaded model, its file."""
    path = getattr(model, 'source_file', None)
    return f'{role} ({os.path.basename(path)})' if path else role


def check_agreement(schedule, vae):
    """Every model of the schedule against the first, and the first against the VQVAE, whichever flags
    named them (--schedule or the drafter/refiner flags): one line naming the two that differ."""
    roles = {1: ['the VAR'], 2: ['the drafter', 'the refiner']}.get(len(schedule)) or [f'stage {i + 1}' for i in range(len(schedule))]
    first = schedule[0].model
    pairs = [(stage.model, role, first, roles[0], AGREEMENT) for stage, role in zip(schedule[1:], roles[1:])]
    pairs.append((first, roles[0], vae, 'the VQVAE', AGREEMENT[:3]))
    for model, role, other, other_role, keys in pairs:
        for key, what in keys:
            if model.config[key] != other.config[key]:
                why = 'the models of a schedule must agree' if other is first else 'a VAR must be trained on the VQVAE that decodes it'
                raise UserError(f'{model_name(model, role)} has {what} {model.config[key]}, {model_name(other, other_role)} has '
                                f'{other.config[key]}; {why}')


def load_code_schedule(args, device):
    """The schedule the CoDe flags name: --schedule, or the drafter/refiner shorthand (--draft_steps 10
    where allowed: the drafter alone)."""
    if getattr(args, 'stages', None):
        return [Stage(model, stop) for model, stop in load_schedule(args.stages, device)]
    drafter, refiner = load_code_models(args, device)
    return code_schedule(drafter, refiner, args.draft_steps)


def describe_schedule(schedule):
    """'CoDe: VAR-d30 drafts 8 scales, VAR-d16 refines', or every stage's scales for other chains."""
    if len(schedule) == 1:
        return f'VAR-d{schedule[0].model.depth} alone'
    if len(schedule) == 2:
        return f'CoDe: VAR-d{schedule[0].model.depth} drafts {schedule[0].stop} scales, VAR-d{schedule[1].model.depth} refines'
    starts = [0] + [stage.stop for stage in schedule[:-1]]
    return 'cascade: ' + ', '.join(f'VAR-d{m.depth} scales {a + 1}-{stop}' for (m, stop), a in zip(schedule, starts))


def tensor_digest(model) -> str:
    """SHA-256 (16 hex digits) of a model's tensors, names, dtypes and shapes: its weights, however saved
    (0.7 s per GB measured on a 2-core CPU)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f'{name}:{t.dtype}:{tuple(t.shape)};'.encode())
        h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def digest_cache_path():
    return os.path.join(os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'code_var', 'weight_digests.json')


def cached_digest(model) -> str:
    """tensor_digest of a model loaded from a file, remembered per file (real path, size and mtime: a
    changed or replaced file is hashed anew), so a resumed 8 GB run does not hash its weights again."""
    path = getattr(model, 'source_file', None)
    if path is None:
        return tensor_digest(model)
    stat = os.stat(path)
    key = f'{os.path.realpath(path)}|{stat.st_size}|{stat.st_mtime_ns}'
    cache_file = digest_cache_path()
    try:
        with open(cache_file) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        cache[key] = tensor_digest(model)
        try:  # a cache is a convenience: a read-only home only costs the hashing again
            os.makedirs(os.path.dirname(cache_file), exist_ok=True)
            save_json(cache_file, cache)
        except OSError:
            pass
    return cache[key]


def weights_digest(*models) -> str:
    """One digest of several models' weights, wherever their files lie (see cached_digest)."""
    return hashlib.sha256(','.join(cached_digest(m) for m in models).encode()).hexdigest()[:16]
