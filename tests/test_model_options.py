"""model.dropout / norm / interaction = cat / fm / init against today's model, the plain reference
(tests/reference_model.py) and hand-computed formulas; their config checks."""
import copy

import pytest
import torch
from torch import nn

from distrec.config import ConfigError, dump_toml, load_config, to_dict
from distrec.model.dlrm import DLRM, DotInteraction
from tests.reference_model import LocalEmbeddings, ReferenceDLRM
from tests.test_model import accumulated_terms, magnitudes, random_batch, specs
from tests.tolerance import C, assert_within, sum_tol

EPS64 = torch.finfo(torch.float64).eps


def old_mlp(sizes, relu_last):
    """distrec.model.dlrm.mlp as it was before the options: Linear, ReLU on every hidden layer."""
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2 or relu_last:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def build(tspecs, num_dense=4, interaction="dot", seed=0, **options):
    torch.manual_seed(seed)
    return DLRM(num_dense, LocalEmbeddings(tspecs), [16, tspecs[0].dim], [12, 6], interaction, 2, 0, **options)


def test_options_off_is_todays_model_bit_for_bit():
    tspecs = specs()
    torch.manual_seed(0)  # the old construction order: tables, bottom MLP, (no parameters in dot), top MLP
    old = {"emb": LocalEmbeddings(tspecs), "bottom": old_mlp([4, 16, 8], True),
           "top": old_mlp([DotInteraction.out_size(4, 8), 12, 6, 1], False)}
    model = build(tspecs)
    explicit = build(tspecs, dropout=0.0, norm="none", fm=False, init="default")
    want = {**{f"embeddings.{k}": v for k, v in old["emb"].state_dict().items()},
            **{f"bottom.{k}": v for k, v in old["bottom"].state_dict().items()},
            **{f"top.{k}": v for k, v in old["top"].state_dict().items()}}
    for m in (model, explicit):
        got = m.state_dict()
        assert list(got) == list(want)
        assert all(torch.equal(got[k], want[k]) for k in want)
        assert not any(isinstance(x, (nn.Dropout, nn.BatchNorm1d, nn.LayerNorm)) for x in m.modules())
    dense, sparse = torch.randn(9, 4), random_batch(tspecs, 9)
    assert torch.equal(model(dense, sparse), explicit(dense, sparse))


def without_dropout(model):
    stripped = copy.deepcopy(model)
    for name in ("bottom", "top"):
        setattr(stripped, name, nn.Sequential(*[m for m in getattr(model, name) if not isinstance(m, nn.Dropout)]))
    return stripped


def test_dropout_is_active_in_training_and_identity_in_eval():
    tspecs = specs()
    model = build(tspecs, dropout=[0.0, 0.5, 0.3, 0.3])  # bottom's 2 hidden layers, then top's 2
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.5, 0.3, 0.3]
    dense, sparse = torch.randn(33, 4), random_batch(tspecs, 33)
    plain = without_dropout(model)(dense, sparse)
    torch.manual_seed(1)
    first = model(dense, sparse)
    assert not torch.equal(first, plain) and not torch.equal(first, model(dense, sparse))
    model.eval()  # what distrec.trainer.evaluate.predict does
    assert torch.equal(model(dense, sparse), plain)


def test_dropout_in_training_matches_the_reference_mask_for_mask():
    tspecs = specs()
    model = build(tspecs, dropout=0.25)
    ref = ReferenceDLRM.from_model(model)
    dense, sparse = torch.randn(17, 4), random_batch(tspecs, 17)
    # Both draw one bernoulli mask per dropout layer in the same order from the same seed; the abs run
    # of magnitudes() too, so its bound covers the same kept units (scaled by 1 / (1 - p) > 0).
    outs = []
    for net in (model, ref):
        torch.manual_seed(7)
        outs.append(net(dense, sparse))
    torch.manual_seed(7)
    mag_out, _, _ = magnitudes(ref, dense, sparse)
    assert_within(outs[0], outs[1], sum_tol(mag_out, accumulated_terms(model, 17, 3)[0]), "logits")


def error_bounds(model, dense, sparse):
    """(M, A) for one forward of a copy of ``model`` in its mode: M the largest sum|terms| of any Linear
    output (|x| |W|^T + |b|, by hooks) or dot of two pooled dim-vectors (dim * max|v|^2); A the product
    over the norm layers of 2 * max|gamma| * max(1, max|x|) / sqrt(min var + eps), with the variance
    this forward divides by: how much each norm can turn an error relative to its input into an error
    of its output."""
    model = copy.deepcopy(model)
    seen, amp = [0.0], [1.0]

    def linear(m, inputs, out):
        x = inputs[0].abs() @ m.weight.abs().T + (m.bias.abs() if m.bias is not None else 0)
        seen[0] = max(seen[0], float(x.max()))

    def norm(m, inputs, out):
        x = inputs[0]
        if isinstance(m, nn.LayerNorm):
            var = x.var(1, unbiased=False)
        else:
            var = x.var(0, unbiased=False) if m.training else m.running_var
        amp[0] *= 2 * float(m.weight.abs().max()) * max(1.0, float(x.abs().max())) / float(var.min() + m.eps) ** 0.5
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.register_forward_hook(linear)
        elif isinstance(m, (nn.BatchNorm1d, nn.LayerNorm)):
            m.register_forward_hook(norm)
    with torch.no_grad():
        model(dense, sparse)
        pooled = model.embeddings(sparse)
    return max(seen[0], model.dim * float(pooled.abs().max()) ** 2), amp[0]


@pytest.mark.parametrize("norm", ["batch", "layer"])
@pytest.mark.parametrize("interaction", ["dot", "cat", "dcn"])
def test_norm_layers_match_the_reference_formulas(norm, interaction):
    tspecs = specs()
    model = build(tspecs, interaction=interaction, norm=norm)
    kind = nn.BatchNorm1d if norm == "batch" else nn.LayerNorm
    norms = [m for m in model.modules() if isinstance(m, kind)]
    assert [m.normalized_shape[0] if norm == "layer" else m.num_features for m in norms] == [16, 8, 12, 6]
    for layers in (model.bottom, model.top):  # Linear -> norm -> ReLU
        names = [type(m).__name__ for m in layers]
        assert all(names[i - 1] == "Linear" and names[i + 1] == "ReLU" for i, m in enumerate(layers)
                   if isinstance(m, kind))
    with torch.no_grad():  # running statistics other than 0 / 1, so eval mode checks that they are used
        for m in norms:
            if norm == "batch":
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    # Both in float64 from the same float32 values (the reference's bags are made float32, then widened).
    ref = ReferenceDLRM.from_model(model).double()
    model.double()
    dense, sparse = torch.randn(17, 4, dtype=torch.float64), random_batch(tspecs, 17)
    # Float64 sums of the same n terms in other orders differ by <= C n EPS64 sum|terms| per layer, with
    # sum|terms| <= M; a norm layer scales an error of its input by 1 / sqrt(var + eps), and its mean and
    # variance carry one of the same order: A (error_bounds) multiplies those factors over the layers.
    # Measured: bounds 2e-11 - 8e-8, differences <= 7e-16; the unbiased variance moves the logits by
    # 9e-4 - 8e-2 and leaving the top MLP's first norm out by 7e-8 (eval, batch) - 0.57.
    n = accumulated_terms(model, 17, 3)[0]
    for train in (True, False):
        model.train(train)
        ref.train(train)
        before = [(m.running_mean.clone(), m.running_var.clone()) for m in norms] if norm == "batch" else []
        got, want = model(dense, sparse), ref(dense, sparse)
        if before and train:  # the fused model's batch norm moved its running stats; the reference never does
            assert not torch.equal(norms[0].running_mean, before[0][0])
            for m, (mean, var) in zip(norms, before):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
        magnitude, amplification = error_bounds(model, dense, sparse)
        tol = C * n * EPS64 * magnitude * amplification
        assert_within(got, want, tol, f"logits ({'train' if train else 'eval'})")


def test_cat_is_dcn_with_no_cross_layers():
    tspecs = specs(dims=(8, 4, 6))
    torch.manual_seed(0)
    cat = DLRM(4, LocalEmbeddings(tspecs), [16, 8], [12, 6], "cat")
    torch.manual_seed(0)
    dcn0 = DLRM(4, LocalEmbeddings(tspecs), [16, 8], [12, 6], "dcn", dcn_layers=0)
    a, b = cat.state_dict(), dcn0.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    dense, sparse = torch.randn(11, 4), random_batch(tspecs, 11)
    assert torch.equal(cat(dense, sparse), dcn0(dense, sparse))
    assert cat.top[0].in_features == 8 + 8 + 4 + 6  # the bottom vector and every pooled vector


def test_fm_term_is_the_hand_computed_formula():
    tspecs = specs(dims=(2, 2, 2), rows=(3, 4, 5))
    with_fm = build(tspecs, fm=True)
    without = build(tspecs)
    sparse = random_batch(tspecs, 4, max_len=2, seed=3)
    dense = torch.randn(4, 4)
    pooled = with_fm.embeddings(sparse).detach()
    w = with_fm.fm.linear.weight.detach()[0]
    want = []
    for b in range(4):  # first order: sum_i w_i x_i; second: sum over pairs f < g of sum_d v_fd v_gd
        v = [pooled[b, 2 * f:2 * f + 2].tolist() for f in range(3)]
        first = sum(float(w[i]) * float(pooled[b, i]) for i in range(6))
        second = sum(v[f][d] * v[g][d] for f in range(3) for g in range(f + 1, 3) for d in range(2))
        want.append(first + second)
    want = torch.tensor(want)
    # Python sums in float64 of 6 + 6 products of float32 values: the float32 FM differs by the float32
    # rounding of its 12 terms (C n EPS32 sum|terms|, n = 12).
    terms = (w.abs() * pooled.abs()).sum(1) + 0.5 * (pooled.view(4, 3, 2).abs().sum(1) ** 2).sum(1)
    got = with_fm.fm(pooled, 2)
    assert_within(got, want.float(), sum_tol(terms, 12), "fm term")
    # Made last: every other parameter as without fm, and the logit is the rest plus the term.
    other = {k: v for k, v in with_fm.state_dict().items() if not k.startswith("fm.")}
    assert all(torch.equal(v, without.state_dict()[k]) for k, v in other.items())
    assert_within(with_fm(dense, sparse) - without(dense, sparse), got, sum_tol(terms, 12) + 4 * 2 ** -23 *
                  without(dense, sparse).abs().detach(), "logit difference")


@pytest.mark.parametrize("interaction", ["dot", "cat", "dcn"])
def test_fm_model_matches_reference_pairwise_sum(interaction):
    tspecs = specs()
    model = build(tspecs, interaction=interaction, fm=True, dropout=0.2)
    model.eval()
    ref = ReferenceDLRM.from_model(model).eval()
    dense, sparse = torch.randn(17, 4), random_batch(tspecs, 17)
    mag_out, _, _ = magnitudes(ref, dense, sparse)
    assert_within(model(dense, sparse), ref(dense, sparse), sum_tol(mag_out, accumulated_terms(model, 17, 3)[0]),
                  "logits")


@pytest.mark.parametrize("init", ["xavier_uniform", "xavier_normal"])
def test_mlp_init_xavier(init):
    model = build(specs(), interaction="dcn", init=init, fm=True)
    linears = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.startswith("embeddings")]
    assert len(linears) == 2 + 2 + 3 + 1  # bottom, cross, top, fm
    for m in linears:
        fan = m.in_features + m.out_features
        assert m.bias is None or torch.equal(m.bias, torch.zeros_like(m.bias))
        if init == "xavier_uniform":
            assert float(m.weight.abs().max()) <= (6 / fan) ** 0.5
    # xavier_normal: std sqrt(2 / fan); the sample std of the n = 1024 weights of a 32x32 cross layer
    # (32 = 8 + 3 * 8) lies within 6 sd(s) = 6 std / sqrt(2 n) of it (sd(s) of a normal sample).
    if init == "xavier_normal":
        w = model.interaction.layers[0].weight
        std = (2 / (2 * w.shape[0])) ** 0.5
        assert abs(float(w.std()) - std) <= 6 * std / (2 * w.numel()) ** 0.5


def write(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text('[schema]\npreset = "none"\ndense = ["d0"]\ncategorical = ["a", "b"]\n'
                 '[tables]\ndim = 4\n[model]\nbottom_mlp = [8, 4]\ntop_mlp = [6]\n' + text)
    return str(p)


@pytest.mark.parametrize("override, key", [
    ("--model.norm=batchnorm", "model.norm"),
    ("--model.interaction=concat", "model.interaction"),
    ("--model.init=he", "model.init"),
    ("--model.dropout=[0.1]", "model.dropout"),
    ("--model.dropout=1.5", "model.dropout"),
    ("--model.dropout=high", "model.dropout"),
    ("--tables.init=ones", "tables.init"),
    ('--tables.inits=["uniform","ones"]', "tables.inits"),
    ('--tables.inits=["uniform"]', "tables.inits"),
    ("--tables.init=normal --tables.init_std=0", "tables.init_std"),
    ("--model.fm=true --tables.dims=[4,2] --model.interaction=cat", "model.fm"),
])
def test_bad_option_values_name_the_key(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as e:
        load_config(write(tmp_path, ""), override.split(" "))
    assert "\n" not in str(e.value)


def test_options_in_the_resolved_config(tmp_path):
    cfg = load_config(write(tmp_path, 'dropout = [0.0, 0.1, 0.2]\nnorm = "layer"\ninteraction = "cat"\n'
                                      'fm = true\ninit = "xavier_normal"\n'),
                      ['--tables.inits=["normal","zeros"]', "--tables.init_stds=[0.05,0.01]"])
    text = dump_toml(cfg)  # what the trainer writes to logging.dir/config.toml
    (tmp_path / "resolved.toml").write_text(text)
    again = load_config(str(tmp_path / "resolved.toml"))
    assert to_dict(again) == to_dict(cfg)
    d = to_dict(again)
    assert d["model"]["dropout"] == [0.0, 0.1, 0.2] and d["model"]["norm"] == "layer" and d["model"]["fm"]
    assert d["tables"]["inits"] == ["normal", "zeros"] and d["tables"]["init_stds"] == [0.05, 0.01]
    assert d["tables"]["init"] == "uniform" and 'init = "uniform"' in text
    model = DLRM.from_config(again, LocalEmbeddings(__import__("distrec.config").config.table_specs(again)))
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.1, 0.2]
    assert isinstance(model.top[1], nn.LayerNorm) and model.fm is not None


def test_ps_server_rows_follow_tables_init(tmp_path):
    from distrec.config import table_specs
    from distrec.tools.ps.server import ParamServer
    cfg = load_config(write(tmp_path, ""), ['--tables.inits=["zeros","normal"]', "--tables.init_std=0.5",
                                            "--tables.cardinality=4000"])
    server = ParamServer(cfg, table_specs(cfg), index=0, num_servers=1)
    assert torch.equal(server.weights[0].detach(), torch.zeros(4000, 4))
    # normal(0, 0.5): sample std within 6 standard errors, 6 * 0.5 / sqrt(2 n), n = 16000
    assert abs(float(server.weights[1].std()) - 0.5) <= 6 * 0.5 / (2 * 16000) ** 0.5
