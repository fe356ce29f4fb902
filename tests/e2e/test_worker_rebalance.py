"""Consumer-group rebalances: a second worker joins the group, then leaves it. Each time the partitions
are revoked and assigned again (eager protocol), and every prompt, in every partition, still completes:
a partition that comes back to a worker after a rebalance is consumed again."""

import pytest

from conftest import llm_answer, unique, wait_for

N = 30


@pytest.fixture(scope="module")
def api(cluster):
    return cluster.start("api")


def assigned_count(worker):
    return worker.proc.log().count("kafka: assigned")


def submit_batch_and_complete(api, kafka, cluster, label):
    tag = unique(label)
    accepted = {}
    for i in range(N):
        p = f"{tag} n{i}"
        accepted[api.submit(p)["conversation_id"]] = p
    partitions = {m["partition"] for m in kafka.read(cluster.topic_prompts) if m["key"] in accepted}
    assert partitions == {0, 1, 2}, f"the batch did not reach every partition: {partitions}"
    bodies = api.wait_all_done(accepted, timeout=30, kafka=kafka, topic=cluster.topic_prompts)
    for cid, p in accepted.items():
        b = bodies[cid]
        assert (b["status"], b["llm_response"]) == ("complete", llm_answer(p)), b


def test_partitions_are_consumed_again_after_rebalances(cluster, api, kafka):
    w1 = cluster.start("worker")
    submit_batch_and_complete(api, kafka, cluster, "one-worker")

    # A second worker joins: the group rebalances and the partitions are split between the two.
    w2 = cluster.start("worker")
    wait_for(lambda: assigned_count(w1) >= 2, 60, "the first worker to be assigned partitions again after the join")
    submit_batch_and_complete(api, kafka, cluster, "two-workers")

    # The second worker leaves: the first gets every partition back.
    problems = w2.proc.stop()
    assert not problems, "\n".join(problems)
    wait_for(lambda: assigned_count(w1) >= 3, 60, "the first worker to be assigned partitions again after the leave")
    submit_batch_and_complete(api, kafka, cluster, "after-leave")
