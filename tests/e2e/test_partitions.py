"""Which partition a prompt goes to. New conversations get ids whose key falls in one partition of the prompts
topic for --prompt-sticky-ms at a time, so that their prompts share produce requests; a conversation's later
turns follow its key, so they stay in its partition whatever the setting."""

from conftest import unique, wait_for

PARTITIONS = 6


def partitions_of(kafka, topic, cids, n):
    """{conversation id: [partition of each of its prompts]} once n prompts of cids are in topic."""
    got = {}

    def read():
        got.clear()
        for m in kafka.read(topic):
            if m["key"] in cids:
                got.setdefault(m["key"], []).append(m["partition"])
        return sum(len(v) for v in got.values()) >= n

    wait_for(read, 30, f"{n} prompts in {topic}")
    return got


def submit_and_locate(cluster, kafka, sticky_ms, n):
    """n new conversations, then a second turn for the first 5, through an API with --prompt-sticky-ms set;
    returns the ids in order and where each conversation's prompts went. Checks the follow-ups kept theirs."""
    api = cluster.start("api", partitions=PARTITIONS, prompt_sticky_ms=sticky_ms)
    tag = unique("sticky%d" % sticky_ms)
    cids = [api.submit(f"{tag} {i}")["conversation_id"] for i in range(n)]
    for cid in cids[:5]:
        api.submit(f"{tag} again", conversation_id=cid)
    parts = partitions_of(kafka, cluster.topic_prompts, set(cids), n + 5)
    for cid in cids[:5]:
        assert len(parts[cid]) == 2 and parts[cid][0] == parts[cid][1], (cid, parts[cid])
    assert not api.proc.stop()
    return cids, parts


def test_new_conversations_share_a_partition_while_sticky(cluster, kafka):
    cids, parts = submit_and_locate(cluster, kafka, 10000, 20)
    # The first prompt is partitioned before the API has seen the topic's partition count: it may be anywhere.
    first = {cid: parts[cid][0] for cid in cids[1:]}
    assert len(set(first.values())) == 1, f"new conversations within the window spread over partitions: {first}"


def test_new_conversations_spread_when_not_sticky(cluster, kafka):
    cids, parts = submit_and_locate(cluster, kafka, 0, 30)
    # 30 random keys in one partition out of 6: a chance of 6^-29.
    assert len({parts[cid][0] for cid in cids}) > 1, parts
