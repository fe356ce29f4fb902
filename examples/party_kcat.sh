#!/usr/bin/env bash
# party_kcat.sh - an interested party with stock tools, kcat and jq (docs/PARTIES.md): one line per finished
# answer of async_llm_response, in a consumer group of its own.
#
# Usage: examples/party_kcat.sh BROKERS GROUP [TOPIC]
#   e.g. examples/party_kcat.sh localhost:9092 my-party
#
# kcat's balanced consumer (-G) commits the offsets of what it has printed, every few seconds, whether or not
# jq got to handle it: after a crash a few responses may be skipped or seen twice. A party that must not miss
# one commits after its side effect, as the C example (examples/party_min.c) does.
set -euo pipefail
brokers=${1:?usage: party_kcat.sh BROKERS GROUP [TOPIC]}
group=${2:?usage: party_kcat.sh BROKERS GROUP [TOPIC]}
topic=${3:-async_llm_response}

kcat -b "$brokers" -G "$group" -X auto.offset.reset=earliest -q -u -f '%s\n' "$topic" |
  jq --unbuffered -r 'select(.status == "complete")
                      | "\(.conversation_id) turn \(.turn): \(.llm_response | length) characters"'
