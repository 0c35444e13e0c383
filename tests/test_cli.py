"""The `minisd` command: argument parsing, one-line errors, generate on a tiny trained pipeline, train-mnist resume."""
import os, subprocess, sys
from pathlib import Path
import pytest
import torch
from PIL import Image
import minisd.train
from minisd.cli import main, build_parser
from minisd.core import image_grid
from minisd.learner import load_state


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
    "A `train-mnist --fast` run that is interrupted in the U-Net stage, then rerun to completion."
    out = tmp_path_factory.mktemp('cli')/'run'
    calls, real = [0], minisd.train.ddpm_loss
    def flaky(*a, **k):  # Ctrl-C on the 3rd U-Net step
        calls[0] += 1
        if calls[0] == 3: raise KeyboardInterrupt
        return real(*a, **k)
    mp = pytest.MonkeyPatch()
    mp.setattr(minisd.train, 'ddpm_loss', flaky)
    first = main(['train-mnist', '--out', str(out), '--fast', '--device', 'cpu'])
    mp.undo()
    ck = out/'checkpoints'
    mtimes = {f: (ck/f).stat().st_mtime_ns for f in ('vae.safetensors', 'clip.safetensors')}
    second = main(['train-mnist', '--out', str(out), '--fast', '--device', 'cpu'])
    return out, first, second, mtimes


def test_parse_defaults():
    a = build_parser().parse_args(['generate', 'a seven', '--model', 'm'])
    assert (a.steps, a.guidance_scale, a.num_images, a.strength, a.out, a.dtype, a.init_image) == (25, 7.5, 1, 0.8, 'image.png', 'auto', None)
    a = build_parser().parse_args(['train-mnist', '--out', 'd', '--epochs', '3', '--seed', '5'])
    assert (a.out, a.epochs, a.seed, a.fast, a.data) == ('d', 3, 5, False, 'auto')


@pytest.mark.parametrize('argv, needle', [
    (['generate', 'x', '--model', 'm', '--strength', '1.5'], 'strength'),
    (['generate', 'x', '--model', 'm', '--steps', '0'], 'steps'),
    (['generate', 'x', '--model', 'm', '--dtype', 'float64'], 'dtype'),
    (['generate', 'x'], '--model'),
    (['train-mnist'], '--out'),
    ([], 'COMMAND'),
])
def test_bad_arguments_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as e: main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert '\n' not in err and needle in err and err.startswith('minisd')


def test_missing_model_one_line(tmp_path, capsys):
    assert main(['generate', 'x', '--model', str(tmp_path/'nope'), '--out', str(tmp_path/'x.png')]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith('minisd generate: error: model not found') and '\n' not in err
    assert not (tmp_path/'x.png').exists()


def test_grid_shapes():
    ims = [Image.new('L', (8, 4)) for _ in range(7)]
    assert image_grid(ims).size == (24, 12) and image_grid(ims[:2]).size == (16, 4) and image_grid(ims[:1]).size == (8, 4)


def test_train_mnist_interrupted_then_resumed(run_dir):
    out, first, second, mtimes = run_dir
    assert first == 130 and second == 0      # Ctrl-C: status 130; the rerun finishes
    for f in ('model_index.json', 'samples.png', 'unet/config.json', 'vae/diffusion_pytorch_model.safetensors',
              'text_encoder/model.safetensors', 'tokenizer/vocab.json', 'scheduler/scheduler_config.json'):
        assert (out/f).exists(), f
    ck = out/'checkpoints'
    assert {f: (ck/f).stat().st_mtime_ns for f in mtimes} == mtimes   # finished stages were skipped, not redone
    assert load_state(ck/'unet.safetensors')['pos']['epoch'] == 1
    assert Image.open(out/'samples.png').size == (8 * 32, 10 * 32)


def test_train_mnist_other_epochs(run_dir, capsys):
    "A finished stage is kept for fewer epochs; an unfinished one of another length is a clear one-line error."
    out, *_ = run_dir
    ck = out/'checkpoints'
    before = {f: (ck/f).stat().st_mtime_ns for f in ('vae.safetensors', 'clip.safetensors', 'unet.safetensors')}
    assert main(['train-mnist', '--out', str(out), '--fast', '--epochs', '2', '--device', 'cpu']) == 1
    err = capsys.readouterr().err.strip()
    assert '1-epoch run' in err and '\n' not in err
    assert {f: (ck/f).stat().st_mtime_ns for f in before} == before


@pytest.mark.parametrize('extra, size', [([], (256, 256)), (['--num-images', '4'], (512, 512)),   # 32x32 enlarged 8x
                                        (['--upscale', '1'], (32, 32)), (['--upscale', '3'], (96, 96)),
                                        (['--num-images', '3', '--height', '16', '--width', '32', '--upscale', '1'], (64, 32))])
def test_generate_png_size(run_dir, tmp_path, extra, size):
    out, *_ = run_dir
    f = tmp_path/'sub'/'img.png'
    assert main(['generate', 'a handwritten seven', '--model', str(out), '--out', str(f), '--steps', '2', '--device', 'cpu', *extra]) == 0
    im = Image.open(f)
    assert im.format == 'PNG' and im.size == size and im.mode == 'L'


def test_generate_seeded_and_img2img(run_dir, tmp_path):
    out, *_ = run_dir
    args = ['generate', 'nine', '--model', str(out), '--steps', '3', '--device', 'cpu', '--seed', '7']
    for n in ('a', 'b'): assert main(args + ['--out', str(tmp_path/f'{n}.png')]) == 0
    assert Image.open(tmp_path/'a.png').tobytes() == Image.open(tmp_path/'b.png').tobytes()   # same seed, same image
    assert main(args + ['--out', str(tmp_path/'i2i.png'), '--init-image', str(tmp_path/'a.png'), '--strength', '0.5']) == 0
    assert Image.open(tmp_path/'i2i.png').size == (256, 256)   # the enlarged a.png went in shrunk back to 32x32
    assert main(args + ['--out', str(tmp_path/'x.png'), '--init-image', str(tmp_path/'missing.png')]) == 1


def test_console_script_bad_model(tmp_path):
    "The installed entry point: one line on stderr and status 1, no traceback."
    r = subprocess.run([sys.executable, '-c', 'import sys; from minisd.cli import main; sys.exit(main())', 'generate', 'x',
                        '--model', str(tmp_path/'none')], capture_output=True, text=True)
    assert r.returncode == 1 and 'Traceback' not in r.stderr and r.stderr.count('\n') == 1


def test_generate_textual_inversion(run_dir, tmp_path, capsys):
    "--textual-inversion FILE[:TOKEN], repeatable: a token whose vector is `seven`'s draws `seven`'s image; bad files: one line."
    from safetensors.torch import save_file
    from minisd.pipeline import StableDiffusion
    out, *_ = run_dir
    p = StableDiffusion.from_pretrained(out)
    te, tok = p.text_encoder, p.tokenizer
    assert 'seven</w>' in tok.encoder and 'two</w>' in tok.encoder
    rows = te.get_input_embeddings().weight.detach()[tok.convert_tokens_to_ids(['seven</w>', 'two</w>'])]
    (tmp_path/'concept').mkdir()
    torch.save({'<lucky>': rows[:1]}, tmp_path/'concept'/'learned_embeds.bin')
    save_file({'emb_params': rows}, tmp_path/'kohya.safetensors')   # two vectors: `<k>` -> `<k> <k>_1`
    args = ['--model', str(out), '--steps', '3', '--device', 'cpu', '--seed', '3']
    def run(prompt, name, *extra): return main(['generate', prompt, *args, '--out', str(tmp_path/name), *extra])
    assert run('a handwritten seven', 'a.png') == 0 and run('a handwritten seven two', 'c.png', '--negative-prompt', 'seven two') == 0
    assert run('a handwritten <lucky>', 'b.png', '--textual-inversion', str(tmp_path/'concept')) == 0
    assert run('a handwritten <k>', 'd.png', '--textual-inversion', f"{tmp_path/'kohya.safetensors'}:<k>",
               '--textual-inversion', str(tmp_path/'concept'), '--negative-prompt', '<k>') == 0
    im = lambda n: Image.open(tmp_path/n).tobytes()
    assert im('a.png') == im('b.png'); assert im('c.png') == im('d.png'); assert im('a.png') != im('c.png')
    assert build_parser().parse_args(['generate', 'x', '--model', 'm']).textual_inversion == []
    capsys.readouterr()
    for bad, needle in [(str(tmp_path/'missing.bin'), 'not found'), (str(tmp_path/'kohya.safetensors'), 'token='),
                        (f"{tmp_path/'kohya.safetensors'}:", 'empty'), (f"{tmp_path/'concept'}:seven</w>", 'already in')]:
        assert run('x', 'x.png', '--textual-inversion', bad) == 1
        err = capsys.readouterr().err
        assert err.startswith('minisd generate: error:') and needle in err and err.count('\n') == 1, err
    assert not (tmp_path/'x.png').exists()


def test_mnist_pipeline_trains_once_then_reuses(tmp_path, monkeypatch):
    "Trained into a `.partial` folder renamed when complete, then loaded without training; IN_TEST has its own folder."
    import minisd.train as tr
    calls = []
    def fake_train(out, recipe, **kw):
        calls.append((Path(out), recipe)); Path(out).mkdir(parents=True); (Path(out)/'model_index.json').write_text('{}')
    class FakePipe:
        def __init__(self, path): self.path, self.config = path, {}
        def set_progress_bar_config(self, **kw): self.config = kw
    monkeypatch.setattr(tr, 'train_mnist', fake_train)
    monkeypatch.setattr(tr.StableDiffusion, 'from_pretrained', classmethod(lambda cls, p: FakePipe(p)))
    monkeypatch.delenv('IN_TEST', raising=False)
    p = tr.mnist_pipeline(tmp_path)
    assert calls == [(tmp_path/'mnist_sd.partial', tr.MnistRecipe())] and p.path == tmp_path/'mnist_sd'
    assert not (tmp_path/'mnist_sd.partial').exists() and p.config == {'disable': True}
    assert tr.mnist_pipeline(tmp_path).path == tmp_path/'mnist_sd' and len(calls) == 1   # reused
    monkeypatch.setenv('IN_TEST', '1'); monkeypatch.setenv('MINISD_CACHE', str(tmp_path/'env'))
    assert tr.mnist_pipeline().path == tmp_path/'env'/'mnist_sd_fast' and calls[-1][1] == tr.MnistRecipe.fast()


# ---- training commands: finetune, textual-inversion, dreambooth

@pytest.fixture(scope='module')
def tiny_model(tmp_path_factory):
    "A tiny random 1-channel pipeline folder (16x16 images) and a folder of four captioned grayscale images."
    from test_ti_training import tiny_pipe
    import json
    d = tmp_path_factory.mktemp('train_cmds')
    tiny_pipe().save_pretrained(d/'model')
    (d/'ims').mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        Image.fromarray((torch.rand(20, 20, generator=g) * 255).byte().numpy(), 'L').save(d/'ims'/f'{i}.png')
    (d/'ims'/'metadata.jsonl').write_text('\n'.join(json.dumps({'file_name': f'{i}.png', 'text': f'a thin {w}'}) for i, w in enumerate(['five', 'two', 'six', 'seven'])))
    return d


def test_textual_inversion_command_resumes(tiny_model, tmp_path):
    "Interrupted after its first checkpoint, the command resumes from it and ends with the file diffusers reads."
    from safetensors.torch import load_file
    import minisd.ti_training
    argv = ['textual-inversion', '--model', str(tiny_model/'model'), '--images', str(tiny_model/'ims'), '--out', str(tmp_path/'ti'),
            '--token', '<dots>', '--initializer-token', 'a', '--steps', '60', '--batch-size', '2', '--device', 'cpu']
    calls, real = [0], minisd.ti_training.ddpm_loss
    def flaky(*a, **k):  # Ctrl-C on step 55: the checkpoint of step 50 is on disk
        calls[0] += 1
        if calls[0] == 55: raise KeyboardInterrupt
        return real(*a, **k)
    mp = pytest.MonkeyPatch(); mp.setattr(minisd.ti_training, 'ddpm_loss', flaky)
    assert main(argv) == 130
    mp.undo()
    assert load_state(tmp_path/'ti'/'checkpoints'/'textual_inversion.safetensors')['pos']['n_steps'] == 50
    calls[0] = 0
    mp.setattr(minisd.ti_training, 'ddpm_loss', lambda *a, **k: (calls.__setitem__(0, calls[0] + 1), real(*a, **k))[1])
    assert main(argv) == 0
    mp.undo()
    assert calls[0] == 10                                    # only the 10 steps left
    sd = load_file(tmp_path/'ti'/'learned_embeds.safetensors')
    assert list(sd) == ['<dots>'] and sd['<dots>'].shape == (1, 32)


def test_finetune_and_dreambooth_commands(tiny_model, tmp_path):
    from minisd.pipeline import StableDiffusion
    m, ims = str(tiny_model/'model'), str(tiny_model/'ims')
    assert main(['finetune', '--model', m, '--images', ims, '--out', str(tmp_path/'ft'), '--epochs', '1', '--batch-size', '2', '--device', 'cpu']) == 0
    assert main(['dreambooth', '--model', m, '--images', ims, '--out', str(tmp_path/'db'), '--instance-prompt', 'a sks two',
                 '--class-prompt', 'a bold two', '--num-class-images', '2', '--steps', '2', '--batch-size', '2', '--device', 'cpu']) == 0
    base = StableDiffusion.from_pretrained(m).unet.state_dict()
    for run in ('ft', 'db'):
        assert (tmp_path/run/'checkpoints').is_dir()
        new = StableDiffusion.from_pretrained(tmp_path/run).unet.state_dict()
        assert any(not torch.equal(base[k], new[k]) for k in base)


@pytest.mark.parametrize('setup, needle', [
    (lambda d: None, 'no images ('),
    (lambda d: Image.new('RGB', (16, 16)).save(d/'a.png'), 'has 3 channels (RGB); this model takes 1 (L)'),
    (lambda d: (d/'a.png').write_bytes(b'not an image'), "cannot read image"),
])
def test_bad_image_folder_one_line(tiny_model, tmp_path, capsys, setup, needle):
    d = tmp_path/'ims'; d.mkdir(); setup(d)
    argv = ['textual-inversion', '--model', str(tiny_model/'model'), '--images', str(d), '--out', str(tmp_path/'o'),
            '--token', '<x>', '--initializer-token', 'a', '--steps', '1']
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert needle in err and err.count('\n') == 1


def test_missing_captions_and_class_prompt(tiny_model, tmp_path, capsys):
    d = tmp_path/'ims'; d.mkdir()
    Image.new('L', (16, 16)).save(d/'a.png')
    assert main(['finetune', '--model', str(tiny_model/'model'), '--images', str(d), '--out', str(tmp_path/'o')]) == 1
    assert 'no prompt for the images in' in capsys.readouterr().err
    assert main(['dreambooth', '--model', str(tiny_model/'model'), '--images', str(d), '--out', str(tmp_path/'o'),
                 '--instance-prompt', 'a sks two']) == 1
    assert '--class-prompt' in capsys.readouterr().err
# --------------------------------------------------------------------------------------------------------------
# minisd lora, generate --lora

@pytest.fixture(scope='module')
def digit_folder(tmp_path_factory):
    "Eight 28x28 MNIST digits as PNGs with a metadata.jsonl of captions (Hugging Face's imagefolder layout)."
    import json
    from minisd.data import load_mnist, caption
    d = tmp_path_factory.mktemp('digits')
    x, y = load_mnist('train', 'embedded')
    lines = []
    for i in range(8):
        Image.fromarray((x[i, 0] * 255).byte().numpy(), 'L').save(d/f'{i}.png')
        lines.append(json.dumps({'file_name': f'{i}.png', 'text': caption(int(y[i]))}))
    (d/'metadata.jsonl').write_text('\n'.join(lines) + '\n')
    return d


def lora_args(run, images, out, *extra):
    return ['lora', '--model', str(run), '--images', str(images), '--out', str(out), '--epochs', '3', '--batch-size', '4',
            '--device', 'cpu', *extra]


def test_lora_interrupted_then_resumed_equals_one_run(run_dir, digit_folder, tmp_path, capsys):
    "Ctrl-C mid-training: status 130 and a hint; the rerun resumes from the checkpoint and ends where one run ends."
    from safetensors.torch import load_file
    import minisd.ddpm
    run, *_ = run_dir
    assert main(lora_args(run, digit_folder, tmp_path/'once')) == 0
    calls, real = [0], minisd.ddpm.ddpm_loss
    def flaky(*a, **k):   # Ctrl-C on the 4th step (in the 2nd epoch)
        calls[0] += 1
        if calls[0] == 4: raise KeyboardInterrupt
        return real(*a, **k)
    mp = pytest.MonkeyPatch(); mp.setattr(minisd.ddpm, 'ddpm_loss', flaky)
    assert main(lora_args(run, digit_folder, tmp_path/'twice')) == 130
    mp.undo()
    assert 'run the same command again to resume' in capsys.readouterr().err
    assert not (tmp_path/'twice'/'pytorch_lora_weights.safetensors').exists()
    assert main(lora_args(run, digit_folder, tmp_path/'twice')) == 0
    a, b = (load_file(str(tmp_path/d/'pytorch_lora_weights.safetensors')) for d in ('once', 'twice'))
    assert a.keys() == b.keys() and len(a) > 0 and all(k.startswith('unet.') for k in a)
    for k in a: torch.testing.assert_close(a[k], b[k])


def test_generate_with_lora_scales(run_dir, digit_folder, tmp_path):
    run, *_ = run_dir
    assert main(lora_args(run, digit_folder, tmp_path/'l', '--prompt', 'a handwritten digit', '--rank', '2', '--alpha', '4')) == 0
    f = tmp_path/'l'/'pytorch_lora_weights.safetensors'
    gen = ['generate', 'seven', '--model', str(run), '--steps', '3', '--device', 'cpu']
    im = {}
    for name, extra in (('plain', []), ('zero', ['--lora', f'{f}:0']), ('one', ['--lora', str(f)]),
                        ('folder', ['--lora', str(tmp_path/'l')]), ('two', ['--lora', f'{f}:0.5', '--lora', f'{f}:0.5'])):
        assert main(gen + ['--out', str(tmp_path/f'{name}.png'), *extra]) == 0
        im[name] = Image.open(tmp_path/f'{name}.png').tobytes()
    assert im['zero'] == im['plain'] and im['one'] != im['plain'] and im['folder'] == im['one']
    assert im['two'] != im['plain']   # two LoRAs stack (each fused at its scale, then unloaded)


def test_lora_bad_input_one_line(run_dir, digit_folder, tmp_path, capsys):
    run, *_ = run_dir
    bad = tmp_path/'bad'; bad.mkdir()
    (bad/'broken.png').write_bytes(b'not an image')
    rgb = tmp_path/'rgb'; rgb.mkdir(); Image.new('RGB', (28, 28)).save(rgb/'a.png')
    nocap = tmp_path/'nocap'; nocap.mkdir(); Image.new('L', (28, 28)).save(nocap/'a.png')
    empty = tmp_path/'empty'; empty.mkdir()
    cases = [(lora_args(run, tmp_path/'missing', tmp_path/'o'), 'image folder not found'),
             (lora_args(run, empty, tmp_path/'o', '--prompt', 'x'), 'no images'),
             (lora_args(run, bad, tmp_path/'o', '--prompt', 'x'), 'cannot read image'),
             (lora_args(run, rgb, tmp_path/'o', '--prompt', 'x'), 'has 3 channels (RGB); this model takes 1 (L)'),
             (lora_args(run, nocap, tmp_path/'o'), 'no prompt for the images'),
             (lora_args(tmp_path/'nomodel', digit_folder, tmp_path/'o'), 'model not found')]
    for argv, needle in cases:
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert needle in err and '\n' not in err and err.startswith('minisd lora: error:'), err
    from safetensors.torch import save_file
    save_file({'lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight': torch.zeros(2, 8)}, str(tmp_path/'k.safetensors'))
    assert main(['generate', 'x', '--model', str(run), '--lora', str(tmp_path/'k.safetensors'), '--out', str(tmp_path/'x.png')]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith('minisd generate: error: --lora') and 'lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight' in err
    assert '\n' not in err and not (tmp_path/'x.png').exists()


def test_native_size_undoes_only_generates_enlargement():
    from minisd.cli import _native_size
    assert _native_size(Image.new('L', (256, 256)), 32).size == (32, 32)      # an 8x enlarged MNIST output
    assert _native_size(Image.new('L', (96, 64), 0), 32).size == (96, 64)     # not square: left alone
    assert _native_size(Image.new('L', (100, 100)), 32).size == (100, 100)    # not a whole multiple
    assert _native_size(Image.new('RGB', (1024, 1024)), 512).size == (1024, 1024)   # real SD sizes are never touched
