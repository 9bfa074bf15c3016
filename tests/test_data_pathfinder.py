"""Pathfinder / Path-X: generator geometry and labels against an independent pixel flood fill, determinism, source."""

import dataclasses
import pickle

import numpy as np
import pytest
from scipy import ndimage  # a dependency of jax

import effjax.data as data
from effjax.data import pathfinder, pathfinder_gen, pathfinder_snakes

P32 = pathfinder_gen.params_for(32, 14)


def _examples(p, count, seed=0):
    rngs = [pathfinder_gen.example_rng(seed, index) for index in range(count)]
    return pathfinder_gen.make_examples(p, rngs, [pathfinder_gen.label_of(seed, i) for i in range(count)], debug=True)


@pytest.fixture(scope="module")
def examples32():
    return _examples(P32, 200)


def test_lra_parameter_table_and_difficulty_levels():
    assert (P32.padding, P32.margins, P32.paddle_length, P32.paddle_thickness, P32.marker_radius,
            P32.seed_distance, P32.continuity, P32.antialias_scale) == (1, (1,), 2, 0.5, 1.5, 7, 1.0, 2)
    assert (P32.distractor_length, P32.num_distractors, P32.snake_contrasts, P32.paddle_contrasts) == (
        4, 5, (2.0,), (0.75,))
    p128 = pathfinder_gen.params_for(128, 14)
    assert (p128.margins, p128.seed_distance, p128.marker_radius, p128.paddle_thickness, p128.continuity,
            p128.num_distractors, p128.snake_contrasts) == ((2, 3), 20, 3.0, 1.5, 1.8, 8, (0.9,))
    assert [pathfinder_gen.params_for(32, cl).num_distractors for cl in (6, 9)] == [10, 6]


@pytest.mark.parametrize("kwargs, fragment", [(dict(resolution=33), "32, 64, 128, 256"),
                                              (dict(contour_length=7), "6 (easy), 9 (intermediate), 14 (hard)")])
def test_bad_params_fail_in_one_line_naming_the_valid_values(tmp_path, kwargs, fragment):
    with pytest.raises(ValueError, match="Pathfinder") as error:
        data.make_source("pathfinder", "train", cache_dir=str(tmp_path), **kwargs)
    assert fragment in str(error.value) and "\n" not in str(error.value)
    assert not list(tmp_path.iterdir())  # rejected before generating anything


def test_labels_are_balanced():
    labels = np.array([pathfinder_gen.label_of(3, i) for i in range(1001)])
    assert set(labels) == {0, 1}
    assert np.all(labels[0:1000:2] + labels[1:1000:2] == 1)  # each aligned pair holds one of each
    assert abs(2 * np.cumsum(labels)[np.arange(1001)] - np.arange(1, 1002)).max() <= 1  # every prefix within one
    assert 0.4 < labels[0:1000:2].mean() < 0.6  # the order within pairs is random
    _, generated = pathfinder_gen.generate(10, seed=3)
    np.testing.assert_array_equal(generated, labels[:10])


def test_markers_sit_on_the_tips_of_the_target_snakes(examples32):
    for image, label, info in examples32[:60]:
        snake, starts, ends = info["snake"], info["starts"], info["ends"]
        for target in (0, 1):  # the tips are the first paddle's start and the last paddle's end of each target
            rows = np.flatnonzero(snake == target)
            assert len(rows) == P32.contour_length
            np.testing.assert_allclose(info["origin_tips"][target], starts[rows[0]])
            np.testing.assert_allclose(info["terminal_tips"][target], ends[rows[-1]])
        origin = [t for t in (0, 1) if np.allclose(info["markers"][0], info["origin_tips"][t])]
        terminal = [t for t in (0, 1) if np.allclose(info["markers"][1], info["terminal_tips"][t])]
        assert len(origin) == len(terminal) == 1
        assert (origin == terminal) == bool(label)
        for marker in info["markers"]:  # the circles are drawn there, bright
            assert image[tuple(np.round(marker).astype(int))] >= 128


def _tips_connected(info, p, scale, bridge):
    """Flood fill over the paddles' bright pixels (drawn at ``scale``), bridging gaps up to ``bridge`` pixels."""
    canvas = pathfinder_gen.render(info["starts"], info["ends"], np.ones(len(info["starts"])), None, p, scale)
    zone = ndimage.distance_transform_edt(canvas < 0.5) <= bridge * scale / 2
    labels, _ = ndimage.label(zone, structure=np.ones((3, 3)))
    a, b = (tuple(np.round((m + 0.5) * scale - 0.5).astype(int)) for m in info["markers"])
    return labels[a] != 0 and labels[a] == labels[b]


def _bridge(p, info):
    """Halfway between the widest gap inside a snake (2 margin - thickness, plus a raster cell of anchor rounding)
    and the narrowest between snakes (clearance - thickness)."""
    cell = 1 / (8 if p.resolution <= 64 else 4)
    inside = 2 * info["margin"] - p.paddle_thickness + np.sqrt(2) * cell
    between = info["clearance"] - p.paddle_thickness
    assert inside < between
    return (inside + between) / 2


def test_flood_fill_connects_the_markers_iff_label_is_1(examples32):
    # At 32x32 (and in LRA's images) the gaps inside a snake are as wide as the spaces between snakes, so a flood
    # fill over the final pixels cannot tell the labels apart (that is the task). Drawn 16x finer, the bright
    # pixels of consecutive paddles are closer than those of different snakes, and the fill must agree 100%.
    results = np.array([(_tips_connected(info, P32, 16, _bridge(P32, info)), label)
                        for _, label, info in examples32])
    assert np.all(results[:, 0] == results[:, 1]), np.flatnonzero(results[:, 0] != results[:, 1])
    assert 80 < results[:, 1].sum() < 120


def test_flood_fill_agrees_at_path_x_resolution():
    p = pathfinder_gen.params_for(128, 14)
    for _, label, info in _examples(p, 12):
        assert _tips_connected(info, p, 8, _bridge(p, info)) == bool(label)


@pytest.mark.parametrize("resolution, contour_length", [(32, 6), (64, 9), (256, 6)])
def test_other_resolutions_and_levels_render(resolution, contour_length):
    p = pathfinder_gen.params_for(resolution, contour_length)
    image, label, info = _examples(p, 1, seed=5)[0]
    assert image.shape == (resolution, resolution) and image.dtype == np.uint8 and image.max() == 255
    assert (info["snake"] == 0).sum() == (info["snake"] == 1).sum() == contour_length
    assert _tips_connected(info, p, 8, _bridge(p, info)) == bool(label)


def test_deterministic_by_seed_and_independent_of_chunking():
    images, labels = pathfinder_gen.generate(12, seed=7)
    again, again_labels = pathfinder_gen.generate(12, seed=7)
    np.testing.assert_array_equal(images, again)
    np.testing.assert_array_equal(labels, again_labels)
    head, tail = pathfinder_gen.generate_range(0, 5, seed=7), pathfinder_gen.generate_range(5, 12, seed=7)
    np.testing.assert_array_equal(np.concatenate([head[0], tail[0]]), images)
    np.testing.assert_array_equal(np.concatenate([head[1], tail[1]]), labels)
    other, _ = pathfinder_gen.generate(12, seed=8)
    assert all(not np.array_equal(a, b) for a, b in zip(images, other, strict=True))
    assert len({row.tobytes() for row in images}) == 12


def test_spawned_workers_give_the_same_arrays():
    one = pathfinder_gen.generate(24, seed=2, workers=1)
    two = pathfinder_gen.generate(24, seed=2, workers=2)
    for a, b in zip(one, two, strict=True):
        np.testing.assert_array_equal(a, b)


SIZES = dict(num_train=64, num_validation=16, num_test=16)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    cache_dir = str(tmp_path_factory.mktemp("pathfinder"))
    return cache_dir, {split: data.make_source("pathfinder", split, cache_dir=cache_dir, **SIZES)
                       for split in data.common.SPLITS}


def test_source_shapes_dtypes_and_tokens(sources):
    _, splits = sources
    train = splits["train"]
    assert (train.task, train.vocab_size, train.num_classes, train.max_length) == ("classification", 257, 2, 1024)
    assert [len(splits[s]) for s in data.common.SPLITS] == [64, 16, 16]
    example = train[5]
    assert example["inputs"].shape == (1024,) and example["inputs"].dtype == np.int32
    assert example["targets"].shape == () and example["targets"].dtype == np.int32
    np.testing.assert_array_equal(example["inputs"], train.images[5].reshape(-1).astype(np.int32) + 1)
    assert example["inputs"].min() >= 1 and example["inputs"].max() == 256  # no pixel is padding
    assert sum(int(splits[s].labels.sum()) for s in data.common.SPLITS) == 48
    # The splits are consecutive slices of one stream: train first.
    images, labels = pathfinder_gen.generate(96)
    np.testing.assert_array_equal(splits["validation"].images, images[64:80])
    np.testing.assert_array_equal(splits["test"].labels, labels[80:])


def test_source_repr_pickle_and_cache_reuse(sources, monkeypatch):
    cache_dir, splits = sources
    assert repr(splits["train"]) == ("Pathfinder(split='train', resolution=32, contour_length=14, num_train=64, "
                                     "num_validation=16, num_test=16, seed=0)")
    monkeypatch.setattr(pathfinder_gen, "generate", lambda *a, **k: pytest.fail("regenerated a cached dataset"))
    again = data.make_source("pathfinder", "train", cache_dir=cache_dir, workers=3, **SIZES)  # workers: not a key
    np.testing.assert_array_equal(again.images, splits["train"].images)
    restored = pickle.loads(pickle.dumps(again))
    np.testing.assert_array_equal(restored[3]["inputs"], again[3]["inputs"])


def test_default_params_are_lra_sizes():
    params = data.params_of("pathfinder")
    assert params == dict(resolution=32, contour_length=14, num_train=160_000, num_validation=20_000,
                          num_test=20_000, seed=0, workers=0, cache_dir="")
    assert pathfinder.Pathfinder.name == "pathfinder"


def _scene(p, seed):
    """A finished scene on its own raster (every paddle stamped)."""
    rng = pathfinder_gen.example_rng(seed, 0)
    tasks = [lambda raster: pathfinder_snakes.make_scene(p, rng, raster)]
    [(_, (scene, _))] = pathfinder_snakes.lockstep(tasks, pathfinder_snakes.rasters(p, 1))
    return scene


def _chains(g, targets):
    """Per placed target: its segments [L, 2, 2] and the pivot cell after each paddle [L, 2], replayed."""
    chains = []
    for cell, degree, angles in targets:
        start, pivot = g.centre(np.array(cell)), np.array(cell) + g.seed_step[degree + 180]
        segments, pivots = [(start, start + g.seed_end[degree + 180])], [pivot]
        for k in angles:
            centre = g.centre(pivot)
            segments.append((centre + g.ext_start[k], centre + g.ext_end[k]))
            pivot = pivot + g.ext_step[k]
            pivots.append(pivot)
        chains.append((np.array(segments), np.array(pivots)))
    return chains


@pytest.mark.parametrize("resolution", [32, 128])
def test_target_candidates_equal_the_border_raster_and_all_distances(resolution):
    # Reference: the border raster read at every sample, and the distance to every paddle but the predecessor
    # (the engine reads bounds, skips the paddle two back and measures only paddles within reach).
    p = pathfinder_gen.params_for(resolution, 14)
    rngs = [pathfinder_gen.example_rng(9, i) for i in range(4 if resolution == 32 else 2)]
    blocked = 0
    for g, targets in pathfinder_snakes.place_targets(p, rngs):
        chains, reach = _chains(g, targets), pathfinder_snakes._Targets(g, 1).reach
        rows = [[len(g.angles) + degree + 180, *angles] for _, degree, angles in targets]
        for i in (0, 1):
            for n in range(1, p.contour_length):  # target i after n paddles; the other one complete
                pivot = chains[i][1][n - 1]
                border = g.border.reshape(-1)[g.ext_cells_t[:, 0] + pivot[0] * g.size + pivot[1]].any(axis=0)
                np.testing.assert_array_equal(pathfinder_snakes._border_blocked(g, pivot[None])[0], border)
                centre = g.centre(pivot)
                others = np.concatenate([chains[i][0][:n - 1], chains[1 - i][0]])
                near = (pathfinder_snakes._segment_distances(centre + g.ext_start[:, None], centre + g.ext_end[:, None],
                                                             others[None, :, 0], others[None, :, 1])
                        < g.zone).any(axis=1)
                checked = np.concatenate([chains[i][0][:max(n - 2, 0)], chains[1 - i][0]])
                got = pathfinder_snakes._near_candidates(g, centre[None], np.array([rows[i][n - 1]]),
                                                         checked.mean(axis=1)[None], checked[None],
                                                         np.zeros(1, np.int64), reach)[0]
                # Candidates that turn 90 degrees or more weigh 0 and are never drawn, so the engine does not
                # measure them (the paddle two back may be near those).
                drawable = g.weights[rows[i][n - 1]] > 0
                np.testing.assert_array_equal(got[drawable], near[drawable])
                blocked += near[drawable].sum() + border.sum()
    assert blocked > 0


@pytest.mark.parametrize("resolution", [32, 128])
def test_an_example_does_not_depend_on_the_batch_it_runs_in(monkeypatch, resolution):
    # Path-X batches mix both margins (two geometries per round), and finished examples are drawn together (the
    # matrix Lanczos at 32, the banded one at 128); alone, each example must come out the same.
    images, labels = pathfinder_gen.generate_range(3, 9, resolution=resolution, seed=4)
    monkeypatch.setattr(pathfinder_gen, "SLOTS", 2)
    monkeypatch.setattr(pathfinder_gen, "RENDER_BATCH", 4)
    np.testing.assert_array_equal(pathfinder_gen.generate_range(3, 9, resolution=resolution, seed=4)[0], images)
    for row, index in enumerate(range(3, 9)):
        rng = pathfinder_gen.example_rng(4, index)
        rng.integers(2)
        image, label = pathfinder_gen.make_example(pathfinder_gen.params_for(resolution, 14), rng, int(labels[row]))
        np.testing.assert_array_equal(image, images[row])


@pytest.mark.parametrize("size", [32, 128])
def test_banded_lanczos_equals_the_matrix_product(size):
    canvas = np.random.default_rng(size).random((2 * size, 2 * size))
    matrix = pathfinder_gen._lanczos_matrix(size, 2)
    np.testing.assert_allclose(pathfinder_gen.downsample(canvas, 2), np.maximum(matrix @ canvas @ matrix.T, 0.0),
                               atol=1e-12)
    weights, first = pathfinder_gen._lanczos_taps(size, 2)
    np.testing.assert_allclose(pathfinder_gen._reduce(canvas, weights, first, 2), matrix @ canvas, atol=1e-12)


def _dense_distance(a0, a1, b0, b1, points=401):
    """Segment distance by brute force: the closest pair among points every 1/400 along both."""
    t = np.linspace(0.0, 1.0, points)[:, None]
    pa, pb = a0 + t * (a1 - a0), b0 + t * (b1 - b0)
    return np.sqrt(((pa[:, None] - pb[None]) ** 2).sum(-1)).min()


def test_segment_distances_match_brute_force():
    rng = np.random.default_rng(0)
    p0, p1, q0, q1 = rng.uniform(-3, 3, size=(4, 200, 2))
    q1[:20] = q0[:20] + rng.uniform(-0.1, 0.1, size=(20, 2))  # short and crossing ones too
    p1[20:40], q0[20:40], q1[20:40] = -p0[20:40], p0[20:40][:, ::-1], -p0[20:40][:, ::-1]
    got = pathfinder_snakes._segment_distances(p0, p1, q0, q1)
    want = np.array([_dense_distance(*x) for x in zip(p0, p1, q0, q1, strict=True)])
    np.testing.assert_allclose(got, want, atol=0.02)
    assert np.all(got <= want + 1e-9)  # the exact distance never exceeds a sampled one
    # Segments shorter than twice the distance: the ends decide, crossing ones included.
    p0, p1, q0, q1 = rng.uniform(-3, 3, size=(4, 2000, 2))
    p1, q1 = p0 + (p1 - p0) * 0.3, q0 + (q1 - q0) * 0.3  # at most ~2.5 long
    distance = 1.3
    closer = pathfinder_snakes._closer_than(p0, p1, q0, q1, distance)
    np.testing.assert_array_equal(closer, pathfinder_snakes._segment_distances(p0, p1, q0, q1) < distance)
    assert 0 < closer.sum() < len(closer)


@pytest.mark.parametrize("resolution", [32, 128])
def test_every_paddle_keeps_clearance_from_all_but_its_neighbours(resolution):
    # Targets are tested through the raster, distractors by segment distance while their attempts grow unstamped:
    # in finished scenes, no two paddles but consecutive ones of a snake come closer than the clearance.
    p = pathfinder_gen.params_for(resolution, 14)
    examples = _examples(p, 6 if resolution == 32 else 2, seed=11)
    assert sum(len(set(info["snake"].tolist()) - {0, 1}) for *_, info in examples) >= 2 * len(examples)
    for _, _, info in examples:
        starts, ends, snake = info["starts"], info["ends"], info["snake"]
        for i in range(len(starts)):
            for j in range(i + 1, len(starts)):
                if snake[i] == snake[j] and j == i + 1:
                    continue
                a = pathfinder_snakes._segment_distances(starts[i], ends[i], starts[j], ends[j])
                assert a >= info["clearance"] - 1e-9, (i, j, a)


def test_two_back_is_unreachable_with_turns_under_90_degrees():
    # Brute force over a snake's angle triples (first paddle at every extension angle) against the geometry's test.
    for resolution in (32, 128):
        p = pathfinder_gen.params_for(resolution, 14)
        g = pathfinder_snakes._geometry(p, p.margins[-1])
        assert not g.reaches_two_back
        closest = np.inf
        for k0 in range(len(g.angles)):
            for k1 in np.flatnonzero(g.weights[k0] > 0):
                pivot = (g.ext_step[k0] + g.ext_step[k1]) / g.cells
                for k2 in np.flatnonzero(g.weights[k1] > 0):
                    closest = min(closest, _dense_distance(pivot + g.ext_start[k2], pivot + g.ext_end[k2],
                                                           g.ext_start[k0], g.ext_end[k0], 41))
        assert closest > g.clearance
    tight = pathfinder_snakes._Geometry(dataclasses.replace(pathfinder_gen.params_for(32, 14), continuity=0.4), 1)
    assert tight.reaches_two_back  # turns up to 225 degrees can fold a snake back onto itself


def test_distractor_attempts_in_parallel_equal_trying_them_in_turn():
    # Reference: each attempt alone (the others' seeds made unusable), in order; the first success must be the
    # answer of all attempts side by side.
    p = P32
    scene = _scene(p, 1)
    g = scene.g
    rng = np.random.default_rng(5)
    later = 0
    for _ in range(60):
        draws = rng.random((pathfinder_snakes.DISTRACTOR_TRIES,
                            3 * pathfinder_snakes.SEED_TRIES + p.distractor_length - 1))
        [together] = pathfinder_snakes._distractor_answers(g, scene.flat, np.zeros(1, np.int64), (draws,))
        alone = None
        for attempt in range(pathfinder_snakes.DISTRACTOR_TRIES):
            single = draws.copy()
            single[np.arange(len(draws)) != attempt, :2 * pathfinder_snakes.SEED_TRIES] = -0.05  # tails in the border
            [answer] = pathfinder_snakes._distractor_answers(g, scene.flat, np.zeros(1, np.int64), (single,))
            if answer is not None:
                alone = answer
                break
        assert (together is None) == (alone is None)
        if together is not None:
            np.testing.assert_array_equal(together[0], alone[0])
            assert together[1:] == alone[1:]
            later += attempt > 0
    assert later >= 3  # cases where the first attempts failed
