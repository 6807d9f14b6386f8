"""Teacher training, resume and evaluation on the bundled digits (real data, offline)."""

import json
import os

import jax
import numpy as np
import pytest

from bag_jax import checkpoint, data, evaluate, experiment, metrics, settings, teacher
from configs import evaluate as evaluate_config
from tests.conftest import interrupted, tiny_config


def test_digits_teacher_reaches_90_percent(tmp_path):
    c = tiny_config()
    c.teacher.epochs = 5
    directory = teacher.train_teacher(settings.parse(c), str(tmp_path))
    model, variables, meta = checkpoint.load_teacher(directory)
    assert meta['top1'] >= 90.0, meta
    assert meta['data']['name'] == 'digits' and meta['data']['image_shape'] == [8, 8, 1]
    assert meta['num_classes'] == 10 and model.depth == 8
    lines = [m for m in metrics.read_metrics(str(tmp_path)) if m['phase'] == 'teacher']
    assert [m['step'] for m in lines] == [1, 2, 3, 4, 5]
    assert lines[-1]['test_top1'] == pytest.approx(meta['top1'])
    assert os.listdir(tmp_path / 'tensorboard')


def test_interrupted_teacher_resumes_to_the_same_parameters(tmp_path, monkeypatch):
    c = tiny_config()
    uninterrupted = checkpoint.load_teacher(teacher.train_teacher(settings.parse(c), str(tmp_path / 'a')))[1]

    interrupted(monkeypatch, lambda: teacher.train_teacher(settings.parse(c), str(tmp_path / 'b')), epoch=2, phase='teacher')
    assert not checkpoint.is_teacher_checkpoint(str(tmp_path / 'b' / 'teacher'))
    resumed = checkpoint.load_teacher(teacher.train_teacher(settings.parse(c), str(tmp_path / 'b')))[1]
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), uninterrupted, resumed)


def test_evaluate_mode_writes_summary(digits_teacher, tmp_path):
    c = evaluate_config.get_config()
    c.checkpoint = digits_teacher
    summary = experiment.run(c, str(tmp_path))
    with open(tmp_path / 'summary.json') as f:
        written = json.load(f)
    assert written == summary
    assert summary['kind'] == 'teacher' and summary['dataset'] == 'digits'
    assert summary['images'] == 450                       # a quarter of the 1797 digits
    assert summary['top1'] == pytest.approx(checkpoint.load_teacher(digits_teacher)[2]['top1'])
    assert summary['top1'] <= summary['top5'] <= 100.0


def test_evaluate_counts_against_numpy(digits_teacher):
    from bag_jax import parallel
    model, variables, meta = checkpoint.load_teacher(digits_teacher)
    ds = data.load_dataset(tiny_config().data)
    mesh = parallel.make_mesh()
    step = evaluate.make_eval_step(lambda v, x: model.apply(v, x), ds.info, mesh)
    result = evaluate.evaluate(step, parallel.replicate(variables, mesh), ds, mesh, 8)   # many padded batches
    logits = np.asarray(model.apply(variables, data.normalize(ds.x_test, ds.info)))
    top5 = np.argsort(-logits, axis=1)[:, :5]
    assert result['top1'] == pytest.approx(100 * np.mean(logits.argmax(1) == ds.y_test))
    assert result['top5'] == pytest.approx(100 * np.mean((top5 == ds.y_test[:, None]).any(1)))


def test_quantization_reuses_a_finished_teacher(digits_teacher, tmp_path, monkeypatch):
    workdir = tmp_path / 'run'
    os.makedirs(workdir)
    os.symlink(digits_teacher, workdir / 'teacher')
    monkeypatch.setattr(teacher, 'train_teacher', lambda *a, **k: pytest.fail('trained again'))
    assert teacher.ensure_teacher(settings.parse(tiny_config()), str(workdir)) == str(workdir / 'teacher')
    c = tiny_config()
    c.teacher.checkpoint = '/given/elsewhere'
    assert teacher.ensure_teacher(settings.parse(c), str(workdir)) == '/given/elsewhere'


def test_bad_teacher_settings_fail_before_compiling(tmp_path, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError('loaded data or compiled before the config was checked')
    monkeypatch.setattr(jax, 'jit', must_not_run)
    monkeypatch.setattr(data, 'load_dataset', must_not_run)
    c = tiny_config()
    c.mode = 'teacher'
    c.teacher.batch_size = 6
    with pytest.raises(ValueError, match='teacher.batch_size=6 does not split over 4 devices'):
        experiment.run(c, str(tmp_path))
    c = tiny_config()
    c.teacher.lr = -1.0
    with pytest.raises(ValueError, match='teacher.lr=-1.0'):
        teacher.train_teacher(settings.parse(c), str(tmp_path))
    c = evaluate_config.get_config()
    c.checkpoint = str(tmp_path / 'missing')
    c.eval_batch_size = 6
    with pytest.raises(ValueError, match='eval_batch_size=6 does not split over 4 devices'):
        experiment.run(c, str(tmp_path))
    c.eval_batch_size = 8
    with pytest.raises(FileNotFoundError, match='is not a teacher or student checkpoint'):
        experiment.run(c, str(tmp_path))


def test_teacher_training_prints_its_final_accuracy_and_records_its_data(tmp_path, capsys):
    c = tiny_config()
    c.teacher.epochs = 1
    directory = teacher.train_teacher(settings.parse(c), str(tmp_path))
    _, _, meta = checkpoint.load_teacher(directory)
    printed = capsys.readouterr().out
    assert f'teacher trained for 1 epoch(s), final test accuracy; saved to {os.path.abspath(directory)}' in printed
    assert '| checkpoint | model | dataset | images | top-1 % | top-5 % |' in printed
    assert (f'| {os.path.abspath(directory)} | teacher resnet_cifar depth 8 | digits | 450 | {meta["top1"]:.2f} | '
            f'{meta["top5"]:.2f} |') in printed
    assert meta['data_source'] == {'name': 'digits', 'digits_test_fraction': 0.25}


def test_evaluate_prints_a_table(digits_teacher, tmp_path, capsys):
    c = evaluate_config.get_config()
    c.checkpoint = digits_teacher
    capsys.readouterr()
    summary = experiment.run(c, str(tmp_path))
    printed = capsys.readouterr().out
    assert f'evaluated teacher {os.path.abspath(digits_teacher)}' in printed
    assert '| checkpoint | model | dataset | images | top-1 % | top-5 % |' in printed
    assert (f'| {os.path.abspath(digits_teacher)} | teacher resnet_cifar depth 8 | digits | 450 | '
            f'{summary["top1"]:.2f} | {summary["top5"]:.2f} |') in printed


def copy_teacher(source, directory, **meta_changes):
    """The teacher in `source` saved again to `directory`, its metadata changed (a key set to
    None is removed)."""
    _, variables, meta = checkpoint.load_teacher(source)
    meta = {k: v for k, v in {**meta, **meta_changes}.items() if v is not None and k != 'kind'}
    checkpoint.save_teacher(str(directory), variables, meta)
    return str(directory)


def test_evaluate_uses_the_recorded_data_and_its_fields_override(digits_teacher, tmp_path):
    """A checkpoint made on a digits split with 50 % held out is scored on that split (899
    images), unless data.digits_test_fraction says otherwise; one that records no data (saved
    before it was recorded) is scored as before, on its dataset with the default split."""
    half = copy_teacher(digits_teacher, tmp_path / 'half',
                        data_source={'name': 'digits', 'digits_test_fraction': 0.5})
    c = evaluate_config.get_config()
    c.checkpoint = half
    summary = experiment.run(c, str(tmp_path / 'e1'))
    assert summary['images'] == 899 and summary['data']['digits_test_fraction'] == 0.5
    c.data.digits_test_fraction = 0.25
    assert experiment.run(c, str(tmp_path / 'e2'))['images'] == 450
    legacy = copy_teacher(digits_teacher, tmp_path / 'legacy', data_source=None)
    with open(os.path.join(legacy, checkpoint.TEACHER_META)) as f:
        assert 'data_source' not in json.load(f)
    c = evaluate_config.get_config()
    c.checkpoint = legacy
    summary = experiment.run(c, str(tmp_path / 'e3'))
    assert (summary['dataset'], summary['images']) == ('digits', 450)


def test_evaluate_refuses_an_empty_test_split(digits_teacher):
    """An empty test split used to score 0 % (n = max(n, 1))."""
    from bag_jax import parallel
    model, variables, meta = checkpoint.load_teacher(digits_teacher)
    ds = data.load_dataset(tiny_config().data)
    empty = data.ArrayDataset(info=ds.info, x_train=ds.x_train, y_train=ds.y_train, x_test=ds.x_test[:0],
                              y_test=ds.y_test[:0], num_test_total=0)
    mesh = parallel.make_mesh()
    step = evaluate.make_eval_step(lambda v, x: model.apply(v, x), ds.info, mesh)
    with pytest.raises(ValueError, match=r"the test split of 'digits' is empty \(0 of 0 images scored\)"):
        evaluate.evaluate(step, parallel.replicate(variables, mesh), empty, mesh, 8)
