"""Which nodes of a cluster ``gist-ray doctor --address`` checks (gist_ray.launch.doctor), on
node records shaped as ``ray.nodes()`` returns them: the GPU nodes when there are any, else
every node with a CPU; dead nodes never."""

from gist_ray.launch.doctor import targets


def _node(node_id: str, alive: bool = True, **resources: float) -> dict:
    return {"NodeID": node_id, "Alive": alive, "NodeManagerAddress": "10.0.0.1",
            "Resources": {"memory": 1e9, "object_store_memory": 1e8, **resources}}  # fmt: skip


def test_gpu_nodes_are_checked_and_the_cpu_head_is_left_out():
    head, a, b = _node("head", CPU=8), _node("a", CPU=48, GPU=4), _node("b", CPU=48, GPU=8)
    dead = _node("dead", alive=False, CPU=48, GPU=4)
    chosen, skipped = targets([head, a, dead, b])
    assert [n["NodeID"] for n in chosen] == ["a", "b"]
    assert [n["NodeID"] for n in skipped] == ["head"]


def test_without_gpus_every_node_with_a_cpu_is_checked():
    head, a, b = _node("head", CPU=0), _node("a", CPU=1), _node("b", CPU=2)
    chosen, skipped = targets([head, a, b])
    assert [n["NodeID"] for n in chosen] == ["a", "b"]
    assert [n["NodeID"] for n in skipped] == ["head"]
