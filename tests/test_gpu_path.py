"""The CUDA code paths at their real sizes (VAR-d30, VAR-d16, the ch-160 VQVAE) on fake CUDA tensors
(utils/simulate.py), on a machine without a GPU: infer_CoDe.py's and infer_original.py's sampling in fp16
and bf16 autocast, a sample_CoDe.py batch and inpainting (a fine-tuning step: test_gpu_path_finetune.py). A fake run computes no
values, but it fails where a GPU run would: a CPU tensor in a CUDA computation, a dtype mismatch, any read of
a value on the host, and (gpu_checks()) a copy to the host or a matrix product of mixed dtypes while sampling."""
import pytest
import torch

import infer_CoDe
import infer_original
import inpaint_CoDe
import sample_CoDe
from models import VAR, VQVAE, Stage, code_schedule
from models import var as var_module
from utils.cli import autocast, check_sampling, runtime
from utils.infer import prepare, sample
from utils.simulate import fake_cuda, gpu_checks

CUDA = torch.device('cuda')


@pytest.fixture(scope='module')
def fake_gpu():
    """One fake-CUDA session for the module, and the real-size models in it, built once per precision
    (prepare() holds the VAR weights in the autocast dtype). runtime() sets the TF32 flags for a GPU:
    restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    built = {}

    def models(dtype):
        if dtype not in built:
            with CUDA:
                built[dtype] = (VQVAE().eval().requires_grad_(False), VAR(depth=30, embed_dim=1920, num_heads=30).eval().requires_grad_(False),
                                VAR(depth=16, embed_dim=1024, num_heads=16).eval().requires_grad_(False))
        return built[dtype]

    with fake_cuda():
        yield models
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture
def caches(monkeypatch):
    """The dtype and positions of every KV cache allocated."""
    made = []
    original = var_module.KVCache.__init__

    def record(self, *a):
        original(self, *a)
        made.append((self.k.dtype, self.k.device.type, self.k.shape[3]))
    monkeypatch.setattr(var_module.KVCache, '__init__', record)
    return made


def script_run(script, argv, fake_gpu, draft_steps_max=None):
    """The script's own flags and defaults, its runtime() and the schedule it samples, prepared as it prepares it."""
    args = script.parser().parse_args(argv)
    check_sampling(args, draft_steps_max=draft_steps_max)
    device, dtype = runtime(args)
    vae, d30, d16 = fake_gpu(dtype)
    schedule = [Stage(d30, 10)] if script is infer_original else code_schedule(d30, d16, args.draft_steps)
    return args, device, dtype, schedule, vae


def held_in(model, dtype):
    """The dtypes of the linear weights and of the class embedding (which stays fp32)."""
    return {p.dtype for m in model.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters()}, model.class_emb.weight.dtype


@pytest.mark.parametrize('which,dtype', [(infer_CoDe, 'fp16'), (infer_CoDe, 'bf16'), (infer_original, 'fp16'), (infer_original, 'bf16')],
                         ids=['infer_CoDe-fp16', 'infer_CoDe-bf16', 'infer_original-fp16', 'infer_original-bf16'])
def test_infer_sampling_runs_on_cuda(which, dtype, fake_gpu, caches):
    args, device, torch_dtype, schedule, vae = script_run(which, ['--device', 'cuda', '--dtype', dtype], fake_gpu,
                                                          9 if which is infer_CoDe else None)
    assert device.type == 'cuda' and torch_dtype == {'fp16': torch.float16, 'bf16': torch.bfloat16}[dtype]
    prepare(args, schedule, vae, args.class_labels, torch_dtype)
    labels = torch.tensor(args.class_labels, device=device)
    with gpu_checks(), torch.inference_mode(), autocast(device, torch_dtype):
        tokens, images = sample(args, schedule, vae, labels)
    assert tokens.shape == (16, 680) and tokens.device.type == 'cuda' and tokens.dtype == torch.int64
    assert images.shape == (16, 256, 256, 3) and images.device.type == 'cuda' and images.dtype == torch.uint8
    for stage in schedule:
        assert held_in(stage.model, torch_dtype) == ({torch_dtype}, torch.float32)
    assert vae.decoder.conv_in.weight.dtype == torch_dtype and vae.encoder.conv_in.weight.dtype == torch.float32
    positions = [424] if which is infer_original else [155, 424]  # every scale but each model's last (models.var.KVCache)
    assert caches == [(torch_dtype, 'cuda', n) for n in positions]


def test_sample_code_batch_runs_on_cuda(fake_gpu, caches):
    args, device, dtype, schedule, vae = script_run(sample_CoDe, ['--device', 'cuda', '--output_path', 'unused'], fake_gpu, 10)
    prepare(args, schedule, vae, list(range(32)), dtype, '--classes')
    with gpu_checks(), torch.inference_mode(), autocast(device, dtype):
        images, tokens = sample_CoDe.sample_batch(args, schedule, vae, list(range(32)), 3, device)
    assert images.shape == (32, 256, 256, 3) and images.dtype == torch.uint8 and images.device.type == 'cuda'
    assert tokens.shape == (32, 680) and tokens.dtype == torch.int32 and tokens.device.type == 'cuda'
    assert dtype == torch.float16 and caches == [(torch.float16, 'cuda', 155), (torch.float16, 'cuda', 424)]


def test_inpainting_runs_on_cuda(fake_gpu, caches):
    args, device, dtype, schedule, vae = script_run(inpaint_CoDe, ['--device', 'cuda', '--image', 'a.png', 'b.png', '--class_labels', '207,281',
                                                                   '--box', '64,64,192,192'], fake_gpu, 10)
    prepare(args, schedule, vae, args.class_labels, dtype)
    images = torch.zeros(2, 256, 256, 3, dtype=torch.uint8, device=device)
    region = torch.zeros(256, 256, dtype=torch.bool, device=device)
    with gpu_checks(), torch.inference_mode(), autocast(device, dtype):
        tokens, result = inpaint_CoDe.inpaint(args, schedule, vae, images, region, torch.tensor(args.class_labels, device=device))
    assert tokens.shape == (2, 680) and result.shape == (2, 256, 256, 3) and result.device.type == 'cuda'
    assert len(caches) == 2


def test_a_host_sync_or_a_cpu_tensor_in_the_loop_fails(fake_gpu, monkeypatch):
    """What the other tests rely on: a read of a value (.item()), a copy to the host (.cpu()) and a CPU tensor
    inside generate() each raise on fake CUDA, as they would stall or fail a GPU run (the other tests run
    the same loop without them)."""
    from models import sampling
    vae, d30, d16 = fake_gpu(torch.float16)
    schedule = code_schedule(d30, d16, 9)
    labels = torch.tensor([1, 2], device=CUDA)
    original = sampling.sample_tokens
    for mistake, error in ((lambda t: t.max().item(), 'aten._local_scalar_dense'), (lambda t: t.cpu(), 'copy from the GPU to the host'),
                           (lambda t: t + torch.ones(t.shape[-1], dtype=t.dtype), 'found at least two devices')):
        monkeypatch.setattr(sampling, 'sample_tokens', lambda *a, m=mistake, **k: (m(a[0]), original(*a, **k))[1])
        with pytest.raises(Exception, match=error), gpu_checks(), torch.inference_mode(), autocast(CUDA, torch.float16):
            sampling.generate(schedule, vae, labels, seed=0, cfg=1.5, top_k=600, top_p=0.96)


def test_code_n8_at_batch_64_stays_within_11_gb(fake_gpu):
    """The memory the GPU issue set (fp16, batch 64, decode included): CoDe N=8 at most 11 GB, its peak set by the
    drafter's cache of the 155 positions before its last scale (2 x 128 x 30 blocks x 155 x 1920 x 2 bytes)."""
    from utils.simulate import sampling_memory
    vae, d30, d16 = fake_gpu(torch.float16)
    schedule = code_schedule(d30, d16, 8)
    prepare(infer_CoDe.parser().parse_args([]), schedule, vae, [0], torch.float16)  # the weights held in fp16, as the scripts hold them
    sampled, decoded = sampling_memory(schedule, vae, 64, torch.float16)
    assert decoded['total'] == sampled['total'] <= 11e9, 'the decode, 8 images at a time, never sets the peak'
    assert decoded['kv_cache'] == 2 * 128 * 30 * 155 * 1920 * 2
