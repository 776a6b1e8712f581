"""DynamicSpectralClustering and ModuleSearch on a user-written LightningModule (MFTC, METHODS.md §4)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from spec_lightning import BlockRule, DynamicSpectralClustering, ModuleSearch
from spec_lightning.methods.mftc.candidates import Candidate
from spec_lightning.spectral.blocks import BlockMap, GradientSketcher, load_slices, save_slices
from tests.conftest import run_script
from tests.run_mftc_ddp import make_callbacks
from tests.user_model import LayerStack, probe_step

#: The tiny stacks' biases and norms lie outside every block, and the search freezes what it did not select:
#: ModuleSearch and DynamicSpectralClustering say so (asserted by the tests of those messages, pytest.warns);
#: elsewhere here it is expected, not checked.
pytestmark = pytest.mark.filterwarnings(
    "ignore:ModuleSearch. .* outside every block:UserWarning",
    "ignore:DynamicSpectralClustering. .* have no gradient:UserWarning",
)

#: LayerStack's width-6 matrices: fc1 in row blocks of 2 neurons, fc2 in column blocks: 24 blocks.
RULES = [BlockRule("fc1.weight", 0, 2), BlockRule("fc2.weight", 1, 2)]


class ProbedStack(LayerStack):
    """The user's model plus ModuleSearch's probe_step, trained by AdamW with weight decay (which
    would move frozen slices if the search did not put them back)."""

    probe_step = probe_step

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=0.01, weight_decay=0.1)


class SGDProbedStack(LayerStack):
    """The user's model (SGD) with probe_step, as tests/run_mftc_ddp.py trains it."""

    probe_step = probe_step


class Snapshots(L.Callback):
    """The weights after every training batch."""

    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.weights.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})


class GradientSnapshots(L.Callback):
    """The gradients of every step, as the optimiser is about to use them."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, opt: Any) -> None:
        self.grads.append({n: p.grad.clone() for n, p in pl_module.named_parameters()})


def clustering(**kwargs: Any) -> DynamicSpectralClustering:
    options = {"eigenvectors": 6, "clusters": (2, 4), "min_module_size": 2, "update_every_n_steps": 2}
    return DynamicSpectralClustering(RULES, sketch_dim=8, **{**options, **kwargs})


def trainer(tmp_path: Path, callbacks: list[L.Callback], steps: int, logger: bool = False) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        callbacks=callbacks,
        logger=TensorBoardLogger(tmp_path, name="run") if logger else False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )


def test_block_map_slices_and_masks() -> None:
    shapes = {"a.fc1.weight": (6, 4), "a.fc1.bias": (6,), "a.fc2.weight": (4, 6)}
    block_map = BlockMap(shapes, RULES)
    assert block_map.num_blocks == 6 and block_map.names == ["a.fc1.weight", "a.fc2.weight"]
    grad = torch.arange(24.0).view(6, 4)
    blocks = block_map.parameters[0].as_blocks(grad)
    torch.testing.assert_close(blocks[1], grad[2:4].flatten())
    masks = block_map.masks(np.array([1, 5]))
    assert masks["a.fc1.weight"][:, 0].tolist() == [False, False, True, True, False, False]
    assert masks["a.fc2.weight"][0].tolist() == [False] * 4 + [True, True]
    with pytest.raises(ValueError, match="width 4 does not divide axis 0 of a.fc1.weight"):
        BlockMap(shapes, [BlockRule("fc1.weight", 0, 4)])
    with pytest.raises(ValueError, match="no parameter matches the block rules"):
        BlockMap(shapes, [BlockRule("attn.weight", 0, 2)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cuts", [(5,), (2,), (3, 6), (0, 9), ()])
def test_sketches_of_row_parts_add_up_to_the_whole_gradients(
    cuts: tuple[int, ...], dtype: torch.dtype
) -> None:
    """An FSDP2 rank holds rows [a, b) of each gradient: the sketches and squared norms of the parts
    (rows lying across a row block, column blocks cut in every part, an empty part) sum to the whole
    gradient's, computed here block by block from the projection; a bf16 gradient sketches as its
    float32 values (no cut: the whole gradient at once)."""
    rules = [BlockRule("fc1.weight", 0, 3), BlockRule("fc2.weight", 1, 3)]
    block_map = BlockMap({"fc1.weight": (9, 6), "fc2.weight": (9, 6)}, rules)
    sketcher = GradientSketcher(block_map, dim=5, seed=3)
    generator = torch.Generator().manual_seed(0)
    grads = {n: torch.randn(9, 6, generator=generator).to(dtype) for n in block_map.names}
    rows_of_block = grads["fc1.weight"].float().reshape(3, 18)  # row block b: rows 3b..3b+2, row-major
    columns_of_block = (
        grads["fc2.weight"].float().reshape(9, 2, 3).permute(1, 2, 0).reshape(2, 27)
    )  # (j, row)
    expected = torch.cat(
        [
            rows_of_block @ sketcher._projection(18, torch.device("cpu")),
            columns_of_block @ sketcher._projection(27, torch.device("cpu")),
        ]
    )
    energy = torch.cat([rows_of_block.pow(2).sum(1), columns_of_block.pow(2).sum(1)])
    bounds = [0, *cuts, 9]
    parts = [
        sketcher.sketch({n: g[a:b] for n, g in grads.items()}, dict.fromkeys(grads, a))
        for a, b in zip(bounds, bounds[1:], strict=False)
    ]
    torch.testing.assert_close(sum(part[0] for part in parts), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sum(part[1] for part in parts), energy, rtol=1e-5, atol=1e-5)


def test_projection_preserves_squared_norms_in_expectation() -> None:
    """R ~ N(0, 1/s): E||Rᵀ g||² = ||g||², here over 64 blocks of one size (relative sd 1/8 per block,
    so the mean is within 5 % with overwhelming probability); width-1 blocks are allowed."""
    block_map = BlockMap({"w": (64, 50)}, [BlockRule("w", 0, 1)])
    sketcher = GradientSketcher(block_map, dim=128, seed=0)
    grads = torch.randn(64, 50, generator=torch.Generator().manual_seed(1))
    sketches, energy = sketcher.sketch({"w": grads})
    ratio = sketches.pow(2).sum(1) / energy
    assert abs(float(ratio.mean()) - 1.0) < 0.05


def test_sketches_are_random_projections_of_the_block_gradients(tmp_path: Path) -> None:
    callback = clustering(update_every_n_steps=100)
    module = ProbedStack()
    recorder = GradientSnapshots()

    trainer(tmp_path, [recorder, callback], 3).fit(module)
    assert callback._sketcher is not None
    projection = callback._sketcher._projection(12, torch.device("cpu"))
    expected = torch.zeros(24, 8)
    energy = torch.zeros(24)
    for grads in recorder.grads:
        for i in range(4):
            fc1 = grads[f"blocks.{i}.fc1.weight"].reshape(3, 12)
            fc2 = grads[f"blocks.{i}.fc2.weight"].T.reshape(3, 12)
            expected[6 * i : 6 * i + 3] += fc1 @ projection
            expected[6 * i + 3 : 6 * i + 6] += fc2 @ projection
            energy[6 * i : 6 * i + 3] += fc1.pow(2).sum(1)
            energy[6 * i + 3 : 6 * i + 6] += fc2.pow(2).sum(1)
    torch.testing.assert_close(callback._sketches, expected)
    torch.testing.assert_close(callback._energy, energy)


def test_parameters_outside_every_block_are_named_at_fit_start(tmp_path: Path) -> None:
    """The stack's biases lie in no block and not in always_train: the search says they stay frozen."""
    search = ModuleSearch(4, always_train=["head"], probe_steps=1, probe_batches=2, predictor_samples=0)
    with pytest.warns(
        UserWarning, match=r"ModuleSearch: 8 trainable parameter\(s\) lie outside every block.*8 biases"
    ):
        trainer(tmp_path, [clustering(), search], 1).fit(ProbedStack())


def test_library_statistics_match_a_hand_computation_over_several_pending_steps(tmp_path: Path) -> None:
    """Sizes, energies and stabilities of the second update's library, computed by hand: a block's energy
    is the mean of its squared gradient norm over the 3 steps since the first update (not their sum,
    not the mean since the start), a module's the mean over its blocks, its stability the Jaccard
    overlap with the module of the same id after the first update."""
    recorder = GradientSnapshots()
    grads = recorder.grads
    first_labels: list[np.ndarray] = []

    class FirstLabels(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
            if trainer.global_step == 3:
                assert callback.labels is not None
                first_labels.append(callback.labels.copy())

    callback = clustering(update_every_n_steps=3)
    trainer(tmp_path, [recorder, callback, FirstLabels()], 6).fit(ProbedStack())
    assert callback.clusterer.updates == 2 and len(grads) == 6 and callback.labels is not None
    energy = np.zeros(24)  # blocks: per layer i, fc1's row pairs 6i..6i+2, fc2's column pairs 6i+3..6i+5
    for step in grads[3:]:
        for i in range(4):
            fc1 = step[f"blocks.{i}.fc1.weight"].double()
            fc2 = step[f"blocks.{i}.fc2.weight"].double()
            for b in range(3):
                energy[6 * i + b] += float(fc1[2 * b : 2 * b + 2].pow(2).sum())
                energy[6 * i + 3 + b] += float(fc2[:, 2 * b : 2 * b + 2].pow(2).sum())
    energy /= 3
    labels, previous = callback.labels, first_labels[0]
    assert sorted(m.id for m in callback.library) == sorted(set(labels.tolist()))
    for module in callback.library:
        members = sorted(b for b in range(24) if labels[b] == module.id)
        before = {b for b in range(24) if previous[b] == module.id}
        assert module.blocks == members
        assert module.parameters == 12 * len(members)  # a block: 2 rows (or columns) of 6
        assert module.energy == pytest.approx(sum(energy[b] for b in members) / len(members), rel=1e-5)
        jaccard = len(before & set(members)) / len(before | set(members))
        assert module.stability == pytest.approx(jaccard)


def test_clustering_updates_log_and_write_the_library(tmp_path: Path) -> None:
    callback = clustering()
    fitted = trainer(tmp_path, [callback], 6, logger=True)
    fitted.fit(ProbedStack())
    assert callback.clusterer.updates == 3 and callback.labels is not None and len(callback.labels) == 24
    metrics = fitted.callback_metrics
    assert 2 <= metrics["clustering/modules"] <= 4 and 0 <= metrics["clustering/nmi"] <= 1
    assert metrics["clustering/neighbor_recall"] == 1.0  # 24 blocks: the exact search
    run = Path(fitted.log_dir)
    library = json.loads((run / "modules.json").read_text())
    assert sum(len(m["blocks"]) for m in library["modules"]) == 24
    assert sum(m["parameters"] for m in library["modules"]) == 8 * 36
    assert (run / "clustering.png").is_file()


def test_search_trains_only_the_selected_slices(tmp_path: Path) -> None:
    dsca, search, snapshots = (
        clustering(),
        ModuleSearch(4, always_train=["head"], probe_steps=2, probe_batches=2, predictor_samples=3),
        Snapshots(),
    )
    module = ProbedStack()
    start = {n: p.detach().clone() for n, p in module.named_parameters()}
    fitted = trainer(tmp_path, [dsca, search, snapshots], 8, logger=True)
    with pytest.warns(UserWarning, match="DynamicSpectralClustering: .* have no gradient.*zero sketches"):
        fitted.fit(module)
    assert dsca.clusterer.updates == 4  # it goes on clustering after the search, over what still trains
    assert search.selected is not None and len(search.selected) > 0
    before, at_search, end = snapshots.weights[2], snapshots.weights[3], snapshots.weights[-1]
    # The probes are scored on the batches of steps 2 and 3, on which nothing trained (the head too).
    for name in start:
        assert torch.equal(snapshots.weights[1][name], at_search[name]), name
    for name in start:  # before the search only the head trains
        assert torch.equal(before[name], start[name]) != name.startswith("head")
    masks = search.trained_parameters()
    for name, value in end.items():
        if name.startswith("head"):
            assert not torch.equal(value, at_search[name])
        elif name in masks:  # selected slices move, the rest of the matrix does not
            mask = masks[name]
            assert torch.equal(value[~mask], at_search[name][~mask])
            assert not torch.equal(value[mask], at_search[name][mask])
        else:
            assert torch.equal(value, at_search[name]), name
            assert not module.get_parameter(name).requires_grad, f"{name}: no slice selected, no gradient"
    exported = search.export(module, tmp_path / "export")
    fresh = ProbedStack()  # the same seeded initial weights: the slices alone make it the trained model
    assert sorted(load_slices(fresh, exported)) == sorted(masks)
    for name, value in fresh.named_parameters():
        assert torch.equal(value, end[name]), name
    report = json.loads((Path(fitted.log_dir) / "module_search.json").read_text())
    assert report["selected"] and report["heuristic_gap"] >= -1e-12
    assert {"mae", "r2", "spearman"} <= set(report["predictor"])
    assert len(report["predictor"]["measured"]) == 4  # the choice and 3 random combinations
    assert (Path(fitted.log_dir) / "module_search.png").is_file()


def test_probing_restores_weights_and_optimizer_state(tmp_path: Path) -> None:
    dsca = clustering()
    search = ModuleSearch(4, always_train=["head"], probe_steps=1, probe_batches=2, predictor_samples=0)
    module = ProbedStack()
    fitted = trainer(tmp_path, [dsca, search], 4)  # searches at the last step, then probe by hand
    fitted.fit(module)
    assert search.selected is not None and len(search._held_back) == 3
    weights = {n: p.detach().clone() for n, p in module.named_parameters()}
    flags = {n: p.requires_grad for n, p in module.named_parameters()}
    optimizer = fitted.optimizers[0]
    state = {
        k: {n: v.clone() for n, v in s.items() if torch.is_tensor(v)} for k, s in optimizer.state.items()
    }
    first = search._probe(fitted, module, optimizer, np.array([0, 7]))
    for name, p in module.named_parameters():
        assert torch.equal(p, weights[name]) and p.requires_grad == flags[name]
    for key, saved in state.items():
        for field, value in saved.items():
            assert torch.equal(optimizer.state[key][field], value)
    again = search._probe(fitted, module, optimizer, np.array([0, 7]))
    np.testing.assert_array_equal(first.loss, again.loss)  # isolate_rng: a probe is repeatable
    baseline = search._probe(fitted, module, optimizer, np.array([], dtype=np.int64))
    assert not np.array_equal(first.loss, baseline.loss)


def test_resume_restores_clustering_and_search(tmp_path: Path) -> None:
    def callbacks() -> tuple[DynamicSpectralClustering, ModuleSearch]:
        return clustering(), ModuleSearch(
            4, always_train=["head"], probe_steps=2, probe_batches=2, predictor_samples=0
        )

    dsca, search = callbacks()
    first = trainer(tmp_path, [dsca, search], 6)
    first.fit(ProbedStack())
    ckpt = tmp_path / "six.ckpt"
    first.save_checkpoint(ckpt)

    dsca2, search2 = callbacks()
    snapshots = Snapshots()
    module = ProbedStack()
    resumed = trainer(tmp_path, [dsca2, search2, snapshots], 8)
    resumed.fit(module, ckpt_path=ckpt)
    assert search2.selected == search.selected and search2.report == search.report
    assert dsca2.clusterer.updates == 4 and dsca2.steps == 8
    masks = search2.trained_parameters()
    saved = torch.load(ckpt, weights_only=False)["state_dict"]
    for name, value in snapshots.weights[-1].items():  # frozen slices kept their checkpointed values
        if name in masks and masks[name] is not None:
            assert torch.equal(value[~masks[name]], saved[name][~masks[name]])
        elif not name.startswith("head"):
            assert torch.equal(value, saved[name])


def test_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(MisconfigurationException, match="clusters\\[1\\] < eigenvectors"):
        DynamicSpectralClustering(RULES, clusters=(2, 8), eigenvectors=8)
    with pytest.raises(MisconfigurationException, match="max_module_size \\(3\\) must be at least twice"):
        DynamicSpectralClustering(RULES, min_module_size=2, max_module_size=3)
    with pytest.raises(MisconfigurationException, match="nothing to export before the search"):
        ModuleSearch().export(ProbedStack(), tmp_path)
    with pytest.raises(KeyError, match="which the model does not have"):
        save_slices({"x.weight": torch.ones(2)}, {"x.weight": None}, tmp_path / "x.safetensors")
        load_slices(ProbedStack(), tmp_path / "x.safetensors")
    with pytest.raises(MisconfigurationException, match="neighbor_search must be one of .*got 'hnsw'"):
        DynamicSpectralClustering(neighbor_search="hnsw")  # type: ignore[arg-type]
    with pytest.raises(MisconfigurationException, match=r"neighbor_recall must lie in \(0, 1\], got 1.5"):
        DynamicSpectralClustering(neighbor_recall=1.5)
    with pytest.raises(MisconfigurationException, match="plot_every_n_updates=-1"):
        DynamicSpectralClustering(RULES, plot_every_n_updates=-1)
    with pytest.raises(MisconfigurationException, match="predictor_samples must be 0 or >= 2"):
        ModuleSearch(predictor_samples=1)
    with pytest.raises(MisconfigurationException, match="no parameter matches the block rules"):
        trainer(tmp_path, [DynamicSpectralClustering([BlockRule("query.weight", 0, 2)])], 1).fit(
            ProbedStack()
        )
    with pytest.raises(
        MisconfigurationException, match="needs a DynamicSpectralClustering callback before it"
    ):
        trainer(tmp_path, [ModuleSearch(4, always_train=["head"]), clustering()], 1).fit(ProbedStack())
    with pytest.raises(MisconfigurationException, match="does not define"):
        trainer(tmp_path, [clustering(), ModuleSearch(4, always_train=["head"])], 1).fit(LayerStack())
    with pytest.raises(MisconfigurationException, match="comes before the first clustering"):
        trainer(
            tmp_path, [clustering(update_every_n_steps=5), ModuleSearch(4, always_train=["head"])], 1
        ).fit(ProbedStack())
    with pytest.raises(
        MisconfigurationException, match="always_train \\['classifier'\\] matches no parameter"
    ):
        trainer(tmp_path, [clustering(), ModuleSearch(4, always_train=["classifier"])], 1).fit(ProbedStack())
    fsdp = SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(MisconfigurationException, match="FSDPStrategy \\(FSDP1\\).*Use FSDP2"):
        clustering().setup(fsdp, ProbedStack(), "fit")  # type: ignore[arg-type]


def test_ddp_ranks_cluster_and_select_identically(tmp_path: Path) -> None:
    """2 CPU processes (gloo) with half batches: both ranks hold the same labels, selection and weights,
    and the clustering (of the all-reduced gradients) equals one process's with the whole batch."""
    run_script("run_mftc_ddp.py", str(tmp_path), cwd=tmp_path, timeout=300)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0]["selected"] == ranks[1]["selected"] and ranks[0]["selected"] is not None
    assert ranks[0]["report"] == ranks[1]["report"]
    for name, value in ranks[0]["params"].items():
        torch.testing.assert_close(value, ranks[1]["params"][name], rtol=0, atol=0)
    single = make_callbacks()
    trainer(tmp_path, single, 4).fit(SGDProbedStack(batch_size=8))  # clustered at step 4, then searched
    single_labels = single[0].labels
    labels_at_search = ranks[0]["clustering"]["clusterer"]["previous"]  # one update (step 6) later
    np.testing.assert_array_equal(labels_at_search.numpy(), single_labels)


class StubProbes:
    """Fixed per-batch (accuracy, loss) for each probed block set: the search's arithmetic by hand."""

    def __init__(self, table: dict[tuple[int, ...], tuple[list[float], list[float]]]) -> None:
        self.table = table
        self.calls: list[tuple[int, ...]] = []

    def __call__(self, trainer: Any, pl_module: Any, optimizer: Any, blocks: np.ndarray) -> Any:
        from spec_lightning.callbacks.probe import Probe

        key = tuple(int(b) for b in blocks)
        self.calls.append(key)
        accuracy, loss = self.table[key]
        return Probe(np.array(accuracy), np.array(loss))


def test_search_increments_bound_and_predictor_inputs_by_hand(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two search nodes with one candidate each; probe results fixed, everything else by hand:
    b^A = mean(acc) − mean(acc_e), b^L likewise, σ = sd(acc − acc_e, ddof=1) / √n, gain b^A − τσ."""
    dsca = clustering()
    search = ModuleSearch(4, always_train=["head"], probe_steps=1, probe_batches=2, predictor_samples=2)
    fitted = trainer(tmp_path, [dsca, search], 4)
    fitted.fit(ProbedStack())  # a real run, for the clustering and held-back batches
    first, second = [0, 1, 2], [12, 13, 14]  # node blocks.0.fc1 (3 blocks), node blocks.0.fc2
    monkeypatch.setattr(
        search,
        "candidates",
        lambda: [Candidate("blocks.0.fc1", 0, first, 12), Candidate("blocks.0.fc2", 1, second, 12)],
    )
    stub = StubProbes(
        {
            (): ([0.5, 0.7], [1.0, 1.2]),  # N_e
            (0, 1, 2): ([0.6, 1.0], [0.9, 1.1]),  # b^A = 0.2, diffs (0.1, 0.3): σ = 0.1414/√2 = 0.1
            (12, 13, 14): ([0.55, 0.65], [1.0, 1.4]),  # b^A = 0.0, diffs (0.05, −0.05): σ = 0.05
            (0, 1, 2, 12, 13, 14): ([0.7, 0.9], [0.8, 1.0]),  # measured gain 0.2
        }
    )
    monkeypatch.setattr(search, "_probe", stub)
    monkeypatch.setattr(fitted.lightning_module, "log", lambda *args, **kwargs: None)  # outside a loop
    search.selected = None
    search.confidence = 2.5
    search.loss_margin = 0.0
    search.search(fitted, fitted.lightning_module)
    rows = search.report["candidates"]
    assert [r["b_accuracy"] for r in rows] == pytest.approx([0.2, 0.0])
    assert [r["b_loss"] for r in rows] == pytest.approx([-0.1, 0.1])
    assert [r["sigma"] for r in rows] == pytest.approx([0.1, 0.05])
    # Lower bounds 0.2 − 2.5·0.1 = −0.05 and 0 − 2.5·0.05 = −0.125: no positive bound, nothing chosen.
    assert search.report["selected"] == [] and search.report["heuristic_objective"] == pytest.approx(0.0)
    predictor = search.report["predictor"]
    assert predictor["predicted"][0] == 0.0 and predictor["measured"][0] == 0.0  # the (empty) choice
    for combination, predicted, measured in zip(
        stub.calls[4:], predictor["predicted"][1:], predictor["measured"][1:], strict=True
    ):
        expected = {(0, 1, 2): (0.2, 0.2), (12, 13, 14): (0.0, 0.0), (0, 1, 2, 12, 13, 14): (0.2, 0.2)}
        assert (predicted, measured) == pytest.approx(expected[combination])

    assert "exact_objective" in search.report  # 2 candidates <= exact_up_to: the ILP ran too
    search.selected, search.confidence, search.exact_up_to = None, 1.0, 2  # bounds 0.1 and −0.05
    search.search(fitted, fitted.lightning_module)
    assert search.report["selected"] == [0] and search.selected == first
    assert "exact_objective" in search.report  # exactly exact_up_to candidates: still exact
    assert search.report["selected_parameters"] == 12


def test_sixteen_bit_precision_is_refused_with_the_fix() -> None:
    scaled = SimpleNamespace(
        strategy=None, precision="16-mixed", precision_plugin=SimpleNamespace(scaler=object()), callbacks=[]
    )
    with pytest.raises(MisconfigurationException, match="precision='16-mixed'.*Use precision: bf16-mixed"):
        ModuleSearch(4, always_train=["head"]).setup(scaled, ProbedStack(), "fit")  # type: ignore[arg-type]


class Batches(L.Callback):
    """The training batches, in the order the steps see them."""

    def __init__(self) -> None:
        self.batches: list[Any] = []

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, *args: Any
    ) -> None:
        self.batches.append(batch)


def test_resume_inside_the_held_back_window_probes_on_the_held_back_batches(tmp_path: Path) -> None:
    """A checkpoint taken while ModuleSearch holds batches back (steps 0-3 for a search at step 4) keeps
    them, as plain tensors: the resumed run searches on those and the ones it sees next (it used to
    stop, holding too few)."""

    def callbacks() -> tuple[DynamicSpectralClustering, ModuleSearch]:
        return clustering(), ModuleSearch(
            4, always_train=["head"], probe_steps=2, probe_batches=2, predictor_samples=0
        )

    dsca1, search1 = callbacks()
    seen1 = Batches()
    first = trainer(tmp_path, [dsca1, search1, seen1], 2)
    first.fit(ProbedStack())
    ckpt = tmp_path / "two.ckpt"
    first.save_checkpoint(ckpt)
    held = torch.load(ckpt, weights_only=True)["callbacks"][search1.state_key]["held_back"]
    assert len(held) == 2

    dsca2, search2 = callbacks()
    seen2 = Batches()
    trainer(tmp_path, [dsca2, search2, seen2], 8).fit(ProbedStack(), ckpt_path=ckpt)
    assert search2.selected is not None and search2.report
    expected = [*seen1.batches, *seen2.batches[:2]]
    assert len(search2._held_back) == 4
    for got, want in zip(search2._held_back, expected, strict=True):
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def test_held_back_tokenizer_batches_are_saved_as_plain_dicts() -> None:
    """A tokenizer's BatchEncoding is not loadable with weights_only=True; the state holds a dict."""
    from transformers import BatchEncoding

    search = ModuleSearch(4, probe_steps=1, probe_batches=2)
    batch = BatchEncoding({"input_ids": torch.tensor([[1, 2]]), "labels": torch.tensor([0])})
    search._held_back = [batch, (torch.ones(2), [torch.zeros(1)])]
    buffer = io.BytesIO()
    torch.save(search.state_dict(), buffer)
    buffer.seek(0)
    restored = ModuleSearch(4, probe_steps=1, probe_batches=2)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    first, second = restored._held_back
    assert type(first) is dict and torch.equal(first["input_ids"], batch["input_ids"])
    assert torch.equal(second[0], torch.ones(2)) and torch.equal(second[1][0], torch.zeros(1))


def test_sketching_every_nth_step_sums_those_steps_only(tmp_path: Path) -> None:
    """sketch_every_n_steps=3: of 6 steps, the 3rd and 6th gradients are sketched (the step of each
    update among them); the others cost nothing."""
    callback = clustering(update_every_n_steps=6, sketch_every_n_steps=3)
    recorder = GradientSnapshots()

    sketched: list[int] = []
    original = callback._sketch

    def spy(grads: Any) -> Any:
        sketched.append(callback.steps + 1)
        return original(grads)

    callback._sketch = spy  # type: ignore[method-assign]
    updates: list[tuple[int, float]] = []
    callback.update = lambda trainer, module: updates.append(  # type: ignore[method-assign]
        (callback.steps, float(callback._energy.sum()) / callback._pending)  # type: ignore[union-attr]
    )
    trainer(tmp_path, [recorder, callback], 6).fit(ProbedStack())
    assert sketched == [3, 6] and callback.steps == 6 and callback._pending == 2
    assert callback.block_map is not None
    names = callback.block_map.names
    energy = [sum(float(step[n].pow(2).sum()) for n in names) for step in recorder.grads]
    assert updates == [(6, pytest.approx((energy[2] + energy[5]) / 2, rel=1e-5))]
    with pytest.raises(MisconfigurationException, match="must be a divisor of update_every_n_steps"):
        clustering(update_every_n_steps=10, sketch_every_n_steps=4)


def test_block_layers_by_hand() -> None:
    """Each block's layer index from its parameter's name, −1 outside a layer stack."""
    shapes = {"layers.0.fc.weight": (4, 2), "layers.3.fc.weight": (4, 2), "head.weight": (2, 2)}
    rules = [BlockRule("fc.weight", 0, 2), BlockRule("head.weight", 0, 1)]
    assert BlockMap(shapes, rules).block_layers().tolist() == [0, 0, 3, 3, -1, -1]
