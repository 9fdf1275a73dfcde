"""running_containers on kubelet-shaped PodLists, realistic and broken."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.kube.model import ContainerMeta
from agent.kube.pods import pod_labels, running_containers
from simnode.kubelet import build_pod

HOST = "simnode-1"
CONTAINERD_WEB = "a" * 64
CONTAINERD_SIDECAR = "b" * 64
CONTAINERD_INIT = "c" * 64
CRIO_AGENT = "d" * 64
DOCKER_DB = "e" * 64
DOCKER_DEBUG = "f" * 64


def realistic_pods() -> list[dict[str, Any]]:
    web = build_pod(
        "shop",
        "web-7d9c-abcde",
        containers=[
            ("web", "nginx:1.27", f"containerd://{CONTAINERD_WEB}"),
            ("envoy", "envoyproxy/envoy:v1.31", f"containerd://{CONTAINERD_SIDECAR}"),
        ],
        init_containers=[("migrate", "ghcr.io/shop/migrate:3", f"containerd://{CONTAINERD_INIT}")],
        labels={"app": "web", "pod-template-hash": "7d9c"},
        annotations={"prometheus.io/scrape": "true"},
        qos="Burstable",
        owner=("ReplicaSet", "web-7d9c"),
    )
    agent = build_pod(
        "kube-system",
        "node-agent-x2k4f",
        containers=[("agent", "quay.io/acme/agent:2.0", f"cri-o://{CRIO_AGENT}")],
        qos="Guaranteed",
        owner=("DaemonSet", "node-agent"),
    )
    db = build_pod(
        "shop",
        "db-0",
        containers=[("postgres", "postgres:16", f"docker://{DOCKER_DB}")],
        ephemeral_containers=[("debugger-x7", "busybox:1.36", f"docker://{DOCKER_DEBUG}")],
        owner=("StatefulSet", "db"),
    )
    pending = build_pod(
        "shop", "worker-1", containers=[("worker", "shop/worker:1", None)], owner=("Job", "w")
    )
    return [web, agent, db, pending]


def by_id(metas: list[ContainerMeta]) -> dict[str, ContainerMeta]:
    return {m.container_id: m for m in metas}


def test_every_container_with_an_id_across_runtimes_and_status_lists() -> None:
    metas, skipped = running_containers(realistic_pods(), HOST)

    assert skipped == 0
    found = {(m.pod_name, m.container_name, m.runtime, m.container_id) for m in metas}
    assert found == {
        ("web-7d9c-abcde", "web", "containerd", CONTAINERD_WEB),
        ("web-7d9c-abcde", "envoy", "containerd", CONTAINERD_SIDECAR),
        ("web-7d9c-abcde", "migrate", "containerd", CONTAINERD_INIT),  # completed init
        ("node-agent-x2k4f", "agent", "cri-o", CRIO_AGENT),
        ("db-0", "postgres", "docker", DOCKER_DB),
        ("db-0", "debugger-x7", "docker", DOCKER_DEBUG),  # ephemeral
    }  # worker-1 is still ContainerCreating: no id, skipped but not counted


def test_pod_metadata_is_carried_into_each_container() -> None:
    pods = realistic_pods()
    metas = by_id(running_containers(pods, HOST)[0])

    web = metas[CONTAINERD_WEB]
    assert web == ContainerMeta(
        namespace="shop",
        pod_name="web-7d9c-abcde",
        pod_uid=pods[0]["metadata"]["uid"],
        container_name="web",
        container_id=CONTAINERD_WEB,
        runtime="containerd",
        image="docker.io/library/nginx:1.27",  # as the runtime reports it
        host=HOST,
        qos_class="burstable",
        labels={"app": "web", "pod-template-hash": "7d9c"},
        annotations={"prometheus.io/scrape": "true"},
        owner_kind="ReplicaSet",
        owner_name="web-7d9c",
    )
    assert metas[CRIO_AGENT].qos_class == "guaranteed"
    assert metas[CRIO_AGENT].labels == {}
    assert (metas[DOCKER_DB].owner_kind, metas[DOCKER_DB].owner_name) == ("StatefulSet", "db")
    assert metas[DOCKER_DB].qos_class == "besteffort"


def test_image_falls_back_to_the_spec_when_the_status_has_none_or_only_a_digest() -> None:
    pod = build_pod(
        "ns",
        "p",
        containers=[
            ("a", "registry.local/a:1", f"containerd://{'1' * 64}"),
            ("b", "registry.local/b:2", f"containerd://{'2' * 64}"),
        ],
    )
    statuses = pod["status"]["containerStatuses"]
    del statuses[0]["image"]
    statuses[1]["image"] = "sha256:" + "9" * 64

    metas = running_containers([pod], HOST)[0]

    assert [m.image for m in metas] == ["registry.local/a:1", "registry.local/b:2"]


def test_controller_owner_wins_over_the_first_reference() -> None:
    pod = build_pod("ns", "p", containers=[("c", "img:1", f"containerd://{'1' * 64}")])
    pod["metadata"]["ownerReferences"] = [
        {"apiVersion": "v1", "kind": "ConfigMap", "name": "cm", "uid": "u1"},
        {"apiVersion": "batch/v1", "kind": "Job", "name": "job-1", "uid": "u2", "controller": True},
    ]
    meta = running_containers([pod], HOST)[0][0]
    assert (meta.owner_kind, meta.owner_name) == ("Job", "job-1")

    pod["metadata"]["ownerReferences"] = pod["metadata"]["ownerReferences"][:1]
    meta = running_containers([pod], HOST)[0][0]
    assert (meta.owner_kind, meta.owner_name) == ("ConfigMap", "cm")


def test_missing_optional_fields_get_defaults() -> None:
    pod = {
        "metadata": {"name": "bare", "namespace": "ns", "uid": "u-1", "labels": None},
        "status": {"containerStatuses": [{"name": "c", "containerID": "containerd://abc"}]},
    }

    metas, skipped = running_containers([pod], HOST)

    assert skipped == 0
    meta = metas[0]
    assert (meta.image, meta.qos_class, meta.labels, meta.annotations) == (
        "",
        "besteffort",
        {},
        {},
    )
    assert (meta.owner_kind, meta.owner_name) == (None, None)


def test_terminated_crash_looping_and_created_containers_keep_their_metadata() -> None:
    pod = build_pod(
        "ns",
        "p",
        containers=[
            ("done", "img:1", f"containerd://{'1' * 64}", "terminated"),
            ("crashing", "img:1", f"containerd://{'2' * 64}", "waiting"),
        ],
    )
    pod["status"]["containerStatuses"].append(
        {"name": "created", "state": {"waiting": {}}, "containerID": f"containerd://{'3' * 64}"}
    )

    metas, skipped = running_containers([pod], HOST)

    assert [m.container_name for m in metas] == ["done", "crashing", "created"]
    assert skipped == 0


def test_pods_without_status_yet_yield_nothing_and_are_not_malformed() -> None:
    pod = build_pod("ns", "p")
    del pod["status"]

    assert running_containers([pod], HOST) == ([], 0)


def test_a_container_id_listed_twice_is_reported_once() -> None:
    pod = build_pod("ns", "p", containers=[("c", "img:1", f"containerd://{'1' * 64}")])
    twin = copy.deepcopy(pod)

    metas, skipped = running_containers([pod, twin], HOST)

    assert len(metas) == 1
    assert skipped == 0


def test_garbage_is_counted_and_good_entries_survive() -> None:
    good = build_pod("ns", "good", containers=[("c", "img:1", f"containerd://{'1' * 64}")])
    no_uid = build_pod("ns", "no-uid", containers=[("c", "img:1", f"containerd://{'2' * 64}")])
    del no_uid["metadata"]["uid"]
    bad_entries = build_pod("ns", "bad-entries")
    bad_entries["status"]["containerStatuses"] = [
        None,  # 1
        "containerd://" + "3" * 64,  # 2
        {"containerID": f"containerd://{'4' * 64}"},  # 3: no name
        {"name": "x", "containerID": "not-an-id"},  # 4
        {"name": "y", "containerID": 1234},  # 5
        {"name": "z", "containerID": "containerd://"},  # 6
        {"name": "w", "containerID": "://abc"},  # 7
        {"name": "ok", "containerID": f"cri-o://{'5' * 64}", "image": 7},
    ]
    bad_entries["status"]["initContainerStatuses"] = {"name": "not-a-list"}  # 8
    pods: list[Any] = [
        None,  # 9
        42,  # 10
        "pod",  # 11
        {},  # 12: no metadata
        {"metadata": None},  # 13
        {"metadata": {"name": "n", "namespace": "ns", "uid": ""}},  # 14
        {"metadata": {"name": "n", "namespace": "ns", "uid": "u"}, "status": []},  # 15
        no_uid,  # 16
        good,
        bad_entries,
    ]

    metas, skipped = running_containers(pods, HOST)

    assert skipped == 16
    assert sorted(m.container_id for m in metas) == ["1" * 64, "5" * 64]


def test_odd_label_and_owner_values_are_dropped_not_fatal() -> None:
    pod = build_pod("ns", "p", containers=[("c", "img:1", f"containerd://{'1' * 64}")])
    pod["metadata"]["labels"] = {"ok": "yes", "num": 3, "none": None}
    pod["metadata"]["annotations"] = ["not", "a", "map"]
    pod["metadata"]["ownerReferences"] = [None, {"kind": 5, "name": "x"}, "ref"]
    pod["status"]["qosClass"] = 3
    pod["spec"] = "garbage"

    metas, skipped = running_containers([pod], HOST)

    assert skipped == 0
    meta = metas[0]
    assert meta.labels == {"ok": "yes"}
    assert meta.annotations == {}
    assert (meta.owner_kind, meta.owner_name) == (None, None)
    assert meta.qos_class == "besteffort"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "metadata",
                    "status",
                    "spec",
                    "name",
                    "namespace",
                    "uid",
                    "containerStatuses",
                    "initContainerStatuses",
                    "containerID",
                    "image",
                    "labels",
                    "ownerReferences",
                    "qosClass",
                    "kind",
                    "controller",
                    "x",
                ]
            ),
            children,
            max_size=6,
        )
    ),
    max_leaves=40,
)


@settings(max_examples=200, deadline=None)
@given(st.lists(json_values, max_size=5))
def test_any_json_input_is_handled_without_raising(pods: list[Any]) -> None:
    metas, skipped = running_containers(pods, HOST)

    assert skipped >= 0
    assert all(isinstance(m, ContainerMeta) for m in metas)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_mangling_one_field_of_a_real_pod_never_raises(data: st.DataObject) -> None:
    pods = realistic_pods()
    index = data.draw(st.integers(0, len(pods) - 1))
    untouched = running_containers(pods[:index] + pods[index + 1 :], HOST)[0]
    target = pods[index]
    path = data.draw(st.lists(st.sampled_from(["metadata", "status", "spec"]), max_size=1))
    for key in path:
        target = target[key]
    field = data.draw(st.sampled_from(sorted(target)))
    target[field] = data.draw(json_values)

    metas, skipped = running_containers(pods, HOST)

    assert skipped >= 0
    assert all(m in metas for m in untouched)  # only the mangled pod can lose containers


def test_pod_labels_of_every_pod_even_before_its_containers_exist() -> None:
    pending = {
        "metadata": {"namespace": "podtap", "name": "podtap-x", "uid": "u-1",
                     "labels": {"app.kubernetes.io/name": "podtap"}},
        "status": {"phase": "Pending"},
    }
    bare = {"metadata": {"namespace": "a", "name": "b", "uid": "u-2"}}
    malformed = [None, {"metadata": {"name": "no-uid", "namespace": "a"}}, {"metadata": 7}]
    assert pod_labels([pending, bare, *malformed]) == {
        "u-1": {"app.kubernetes.io/name": "podtap"},
        "u-2": {},
    }
