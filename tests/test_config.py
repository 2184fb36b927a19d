import pytest

from graspext.config import list_configs, load_config


def test_every_shipped_config_parses_and_validates():
    names = list_configs()
    assert len(names) >= 22
    for name in names:
        cfg = load_config(name)
        assert cfg.name == name and 0 < cfg.sparsity < 1


def test_paper_settings():
    c100 = load_config("cifar100-resnet32-grasp-98")
    assert (c100.model, c100.prune_options["samples_per_class"], c100.prune_options["iterations"]) == \
        ("resnet32_grasp", 5, 2)
    assert c100.train["weight_decay"] == 1e-4 and c100.train["epochs"] == 160
    tiny = load_config("tiny-imagenet-vgg19-grasp-95")
    assert (tiny.prune_options["samples_per_class"], tiny.prune_options["iterations"], tiny.train["epochs"]) == \
        (1, 10, 300)
    assert load_config("imagenet-resnet50-grasp-80").train is None  # pruning only
    assert load_config("cifar10-vgg19-grasp-90").train["weight_decay"] == 5e-4


def test_rigl_paper_settings():
    from graspext.dst import RigL, from_dict

    for sparsity in (80, 90, 95):
        cfg = load_config(f"cifar10-wrn22_2-rigl-{sparsity}")
        assert (cfg.model, cfg.method, cfg.sparsity, cfg.batch_size) == ("wrn22_2", "random", sparsity / 100, 128)
        assert cfg.prune_options == {"scope": "layerwise", "distribution": "erk", "keep_first_dense": True}
        assert cfg.train["lr"] == 0.1 and cfg.train["lr_gamma"] == 0.2 and cfg.train["weight_decay"] == 5e-4
        steps_per_epoch = -(-50_000 // 128)
        total = cfg.train["epochs"] * steps_per_epoch
        assert abs(total - 97_656) < steps_per_epoch  # the paper's 97,656 steps, in whole epochs
        assert [round(f * total, -3) for f in cfg.train["lr_milestones"]] == [30_000, 60_000, 90_000]
        dst = from_dict(cfg.dst)
        assert dst == RigL(frequency=100, drop_fraction=0.3, end_step=75_000)
        assert dst.resolved_end_step(total) == 75_000
    for model in ("vgg19", "resnet32"):
        for sparsity in (90, 95, 98):
            cfg = load_config(f"cifar10-{model}-rigl-{sparsity}")
            assert from_dict(cfg.dst) == RigL() and cfg.train["epochs"] == 160
    assert from_dict(load_config("digits-vgg11-rigl-90").dst).frequency == 5


@pytest.mark.parametrize("text, match", [
    ('model = "vgg19_bn"\ndataset = "cifar10"\ncolour = 1\n[prune]\nmethod = "snip"\nsparsity = 0.9\n',
     "unknown key"),
    ('model = "vgg19_bn"\ndataset = "mnist"\n[prune]\nmethod = "snip"\nsparsity = 0.9\n', "dataset must be one of"),
    ('model = "vgg19_bn"\ndataset = "cifar10"\n[prune]\nmethod = "obd"\nsparsity = 0.9\n', "prune.method"),
    ('model = "vgg19_bn"\ndataset = "cifar10"\n[prune]\nmethod = "snip"\nsparsity = 1.5\n', "prune.sparsity"),
    ('model = "vgg19_bn"\ndataset = "cifar10"\n[prune]\nmethod = "grasp"\nsparsity = 0.9\nengine = "x"\n',
     "engine must be one of"),
    ('model = "vgg19_bn"\ndataset = "cifar10"\n[prune]\nmethod = "snip"\nsparsity = 0.9\n[train]\nepoch = 3\n',
     "train:"),
    ('model = "vgg19_bn"\ndataset = "cifar10"\n[prune]\nmethod = "snip"\nsparsity = 0.9\n[train]\nlr = inf\n',
     "train: lr must be a finite number"),
    ('model = "vgg19_bn"\ndataset = "cifar10"\n[prune]\nmethod = "snip"\nsparsity = 0.9\n[train]\nweight_decay = nan\n',
     "train: weight_decay must be a finite number"),
    ('model = "vgg19_bn"\ndataset = "cifar10"\nseed = "one"\n[prune]\nmethod = "snip"\nsparsity = 0.9\n',
     r"bad.toml: seed must be an int >= 0, got 'one'"),
    ('model = "vgg19_bn"\ndataset = "cifar10"\nbatch_size = 0\n[prune]\nmethod = "snip"\nsparsity = 0.9\n',
     "bad.toml: batch_size must be an int >= 1, got 0"),
    ('model = 3\ndataset = "cifar10"\n[prune]\nmethod = "snip"\nsparsity = 0.9\n', "model must be a model name"),
    ('model = "vgg19_bn"\ndataset = "cifar10"\n', "missing 'prune'"),
    (('model = "vgg19_bn"\ndataset = "cifar10"\n[prune]\nmethod = "random"\nsparsity = 0.9\n[train]\nepochs = 1\n'
      '[dst]\nmethod = "rigl"\nfrequncy = 10\n'), "dst: unknown dst option.*frequncy"),
    (('model = "vgg19_bn"\ndataset = "cifar10"\n[prune]\nmethod = "random"\nsparsity = 0.9\n[train]\nepochs = 1\n'
      '[dst]\nmethod = "prune"\n'), "dst method must be one of"),
    (('model = "vgg19_bn"\ndataset = "cifar10"\n[prune]\nmethod = "random"\nsparsity = 0.9\n[train]\nepochs = 1\n'
      '[dst]\nmethod = "set"\ndrop_fraction = 1.5\n'), r"dst: drop_fraction must be a number in \(0, 1\)"),
    ('model = "vgg19_bn"\ndataset = "cifar10"\n[prune]\nmethod = "random"\nsparsity = 0.9\n[dst]\nmethod = "rigl"\n',
     r"a \[dst\] table needs a \[train\] table"),
    ('model = "vgg19_bn\n', "not valid TOML"),
])
def test_bad_configs_name_the_problem(tmp_path, text, match):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_config(str(path))
    with pytest.raises(ValueError, match="neither a file nor a shipped config"):
        load_config("no-such-config")
