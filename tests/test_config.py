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
    ('model = "vgg19_bn\n', "not valid TOML"),
])
def test_bad_configs_name_the_problem(tmp_path, text, match):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_config(str(path))
    with pytest.raises(ValueError, match="neither a file nor a shipped config"):
        load_config("no-such-config")
