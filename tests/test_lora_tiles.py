"""Tile sizes per shape (plugins/lora/tiles.py): every candidate computes the float64 formula, and the choice is the
fastest candidate, made once per shape and kept in a file."""
import json

import pytest
import torch

triton = pytest.importorskip("triton")

from surgery_plugins.lora import kernels, tiles

ON_GPU = torch.cuda.is_available() and not kernels.INTERPRETING
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.bfloat16 if ON_GPU else torch.float64


def close(got, want):
    if not ON_GPU:
        torch.testing.assert_close(got.double(), want, rtol=1e-12, atol=1e-12)
        return
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-2


@pytest.fixture
def candidate(monkeypatch):
    """Use one candidate's tiles for every launch of a kind (tuning off)."""
    monkeypatch.setenv("SURGERY_TUNE", "0")

    def use(kind, config):
        monkeypatch.setitem(kernels.CONFIGS, kind, config)
        kernels.clear_launches()
    yield use
    kernels.clear_launches()


def rand(*shape, g):
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(DEVICE, DTYPE)


@pytest.mark.parametrize("i", range(len(tiles.CANDIDATES["down"])))
def test_every_down_candidate_matches_formula(candidate, i):
    candidate("down", tiles.CANDIDATES["down"][i])
    g = torch.Generator().manual_seed(3)
    rows, cols, r, members, p, seed = 70, 136, 20, 2, 0.25, 11
    x, a = rand(rows, cols, g=g), rand(members * r, cols, g=g)
    h = kernels.dropped_down(x, a, members, p, seed)
    ms = [kernels.keep_mask(rows, cols, seed + j, p, DEVICE).double() * kernels.threshold(p)[1] for j in range(members)]
    close(h, torch.cat([(x.double() * ms[j]) @ a[j * r:(j + 1) * r].double().T for j in range(members)], dim=1))


@pytest.mark.parametrize("i", range(len(tiles.CANDIDATES["grads"])))
def test_every_grads_candidate_matches_formula(candidate, i):
    candidate("grads", tiles.CANDIDATES["grads"][i])
    g = torch.Generator().manual_seed(4)
    rows, cols, r, members, p, seed = 90, 136, 20, 3, 0.25, 5
    u, v = rand(rows, cols, g=g), rand(rows, cols, g=g)
    a, dh = rand(members * r, cols, g=g), rand(rows, members * r, g=g)
    dx = rand(rows, cols, g=g)
    before = dx.double().clone()
    da = kernels.input_grads((u, v), dh, a, members, p, seed, dx)
    x = (u.double() * v.double()).to(DTYPE).double()
    ms = [kernels.keep_mask(rows, cols, seed + j, p, DEVICE).double() * kernels.threshold(p)[1] for j in range(members)]
    dhs = [dh[:, j * r:(j + 1) * r].double() for j in range(members)]
    close(da, torch.cat([dhs[j].T @ (x * ms[j]) for j in range(members)]))
    close(dx, before + sum((dhs[j] @ a[j * r:(j + 1) * r].double()) * ms[j] for j in range(members)))


@pytest.mark.parametrize("i", range(len(tiles.CANDIDATES["up"])))
def test_every_up_candidate_matches_formula(candidate, i):
    candidate("up", tiles.CANDIDATES["up"][i])
    g = torch.Generator().manual_seed(5)
    rows, shapes = 150, [(70, 20), (140, 20)]
    width = sum(r for _, r in shapes)
    h = rand(rows, width, g=g)
    dys, b_s = [rand(rows, out, g=g) for out, _ in shapes], [rand(out, r, g=g) for out, r in shapes]
    dh = torch.zeros(rows, width, dtype=DTYPE, device=DEVICE)
    got = kernels.up_grads(dys, b_s, h, [0, 20], dh, [1.0, 2.0], [0.5, 1.0])
    for j, ((out, r), t, u) in enumerate(zip(shapes, [1.0, 2.0], [0.5, 1.0])):
        close(dh[:, 20 * j:20 * (j + 1)], t * dys[j].double() @ b_s[j].double())
        close(got[j], u * dys[j].double().T @ h[:, 20 * j:20 * (j + 1)].double())


@pytest.mark.parametrize("i", range(len(tiles.CANDIDATES["merged"])))
def test_every_merged_candidate_matches_formula(candidate, i):
    candidate("merged", tiles.CANDIDATES["merged"][i])
    g = torch.Generator().manual_seed(6)
    in_f, shapes = 300, [(70, 20, 0.5), (270, 8, 2.0)]
    ws = [rand(out, in_f, g=g) for out, _, _ in shapes]
    a_s, b_s = [rand(r, in_f, g=g) for _, r, _ in shapes], [rand(out, r, g=g) for out, r, _ in shapes]
    got = kernels.merged_weights(ws, a_s, b_s, [s for *_, s in shapes])
    for w, a, b, (_, _, s), m in zip(ws, a_s, b_s, shapes, got):
        close(m, w.double() + s * b.double() @ a.double())


@pytest.fixture
def split(candidate, monkeypatch):
    """A candidate that cuts its sums into column ranges, on a GPU of many multiprocessors for the few row tiles of
    the tests' shapes (kernels._splits), so that it does cut them."""
    monkeypatch.setattr(kernels, "_processors", lambda device: 64)

    def use(kind, i):
        candidate(kind, [c for c in tiles.CANDIDATES[kind] if c.get("waves")][i])
    return use


@pytest.mark.parametrize("i", range(4))
def test_down_in_column_ranges_matches_formula(split, i):
    split("down", i)
    g = torch.Generator().manual_seed(13)
    rows, cols, r, members, p, seed = 70, 1100, 20, 2, 0.25, 11
    x, a = rand(rows, cols, g=g), rand(members * r, cols, g=g)
    launch = kernels._down_launch(DTYPE, rows, cols, cols, members, r, p, torch.device(DEVICE))
    assert launch.constants["SPLIT"] > 1 and launch.grid[2] == launch.constants["SPLIT"]
    h = kernels.dropped_down(x, a, members, p, seed)
    assert h.dtype == DTYPE and h.shape == (rows, members * r)
    ms = [kernels.keep_mask(rows, cols, seed + j, p, DEVICE).double() * kernels.threshold(p)[1] for j in range(members)]
    close(h, torch.cat([(x.double() * ms[j]) @ a[j * r:(j + 1) * r].double().T for j in range(members)], dim=1))


@pytest.mark.parametrize("i", range(3))
@pytest.mark.parametrize("cols", [[0, 20, 28], [0, 30, 50]])  # members' columns of h adjacent, or with gaps
def test_up_in_column_ranges_matches_formula(split, i, cols):
    """dh's parts over the column ranges are added into each member's columns only (the gaps keep what they held);
    a member narrower than a range (100 features) has ranges with nothing to add."""
    split("up", i)
    g = torch.Generator().manual_seed(15)
    rows, shapes, scales = 150, [(1100, 20), (100, 8), (700, 12)], [(1.0, 0.5), (2.0, 1.0), (0.5, 3.0)]
    width = cols[-1] + shapes[-1][1]
    h = rand(rows, width, g=g)
    dys, b_s = [rand(rows, out, g=g) for out, _ in shapes], [rand(out, r, g=g) for out, r in shapes]
    dh = torch.full((rows, width), float("nan"), dtype=DTYPE, device=DEVICE)
    members = [(out, out, col, r) for (out, r), col in zip(shapes, cols)]
    launch, _ = kernels._up_launch(DTYPE, torch.device(DEVICE), rows, width, width, (1.0, 2.0, 0.5), (0.5, 1.0, 3.0),
                                   *members)
    assert launch.constants["SPLIT"] > 1
    got = kernels.up_grads(dys, b_s, h, cols, dh, [t for t, _ in scales], [u for _, u in scales])
    covered = torch.zeros(width, dtype=torch.bool)
    for j, ((out, r), col, (t, u)) in enumerate(zip(shapes, cols, scales)):
        close(dh[:, col:col + r], t * dys[j].double() @ b_s[j].double())
        close(got[j], u * dys[j].double().T @ h[:, col:col + r].double())
        covered[col:col + r] = True
    assert dh[:, ~covered.to(DEVICE)].isnan().all()


@pytest.fixture
def fresh_choices():
    tiles.forget()
    yield
    tiles.forget()


def test_choice_is_the_fastest_candidate_made_once_and_kept_in_the_file(tmp_path, fresh_choices):
    file = tmp_path / "tiles.json"
    candidates = tiles.CANDIDATES["down"]
    speed = [5.0, 3.0, 9.0, 1.0, 4.0] + [6.0] * (len(candidates) - 5)  # ms per candidate, by index
    timed = []

    def trial(config):
        if config is candidates[3]:
            raise RuntimeError("out of shared memory")  # the fastest by the table, but it cannot run: skipped
        return lambda: config

    def timer(fn):
        config = fn()
        timed.append(config)
        return speed[next(i for i, c in enumerate(candidates) if c is config)]

    best = tiles.choose("down", ("bf16", 128, 2048), trial, file, timer=timer)
    assert best == candidates[1]  # 3.0 ms: the fastest that runs
    assert len(timed) == len(candidates) - 1
    assert json.loads(file.read_text()) == {"down|bf16|128|2048": best}
    assert tiles.choose("down", ("bf16", 128, 2048), trial, file, timer=timer) is best
    assert len(timed) == len(candidates) - 1  # known: not timed again

    tiles.forget()  # a new process: the file answers, nothing is timed
    again = tiles.choose("down", ("bf16", 128, 2048), trial, file, timer=lambda fn: pytest.fail("timed again"))
    assert again == best


def test_the_choices_file_is_new_for_other_candidates(monkeypatch):
    """Choices made among other candidates (an older surgery's) are not read: they would keep tiles the new
    candidates beat."""
    key = tiles.candidates_key()
    assert tiles.candidates_key() == key
    monkeypatch.setitem(tiles.CANDIDATES, "down", [*tiles.CANDIDATES["down"], {"BM": 16, "BK": 16, "num_warps": 1,
                                                                               "num_stages": 1}])
    assert tiles.candidates_key() != key


def test_no_candidate_runs_gives_the_default_and_an_unwritable_file_is_not_an_error(tmp_path, fresh_choices):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")

    def trial(config):
        raise RuntimeError("no GPU")
    assert tiles.choose("up", ("k",), trial, blocker / "tiles.json") == tiles.CANDIDATES["up"][0]


def test_tuning_only_on_cuda_and_off_by_the_environment(monkeypatch):
    assert not tiles.enabled(torch.device("cpu"))
    monkeypatch.setenv("SURGERY_TUNE", "0")
    assert not tiles.enabled(torch.device("cuda"))
