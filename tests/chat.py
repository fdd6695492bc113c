"""A scripted multi-turn chat for the session tests, in or out of process.

Run as ``python tests/chat.py JSON-ARGS`` to play turns in a new process
(model dir, store path, history file, first and last turn); it prints one
JSON line with the per-turn reports.

The assistant turns are what a thinking model's client sends back: the
reasoning (here the tokens the model produced, as a tiny random model never
closes its think block) followed by a short answer. The chat template strips
the reasoning from the history, as real thinking templates do.
"""

import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORDS = (
    "the old lighthouse keeper climbed narrow stairs to light the lamp for ships that passed "
    "the rocks in the dark and wrote the weather in a small book with the names of boats"
).split()

SYSTEM = (
    "You are a helpful assistant for a harbor office. Answer questions about ships, weather, "
    "tides and the lighthouse in short, clear sentences. When you are not sure, say so and "
    "suggest who could know. Keep a friendly tone, use plain words, and never invent names "
    "of boats that are not in the log. The log lists every boat that came back each day, "
    "the wind, the waves and the color of the sky in the morning."
)


def user_message(turn):
    rng = random.Random(turn)
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 12)))
    return {"role": "user", "content": f"Question {turn}: {words}?"}


def assistant_message(turn, text):
    return {"role": "assistant", "content": f"<think>\n{text}</think>\n\nAnswer {turn}."}


def play(session, messages, first, last, max_tokens=8):
    """Play turns ``first..last`` (1-based) on ``messages``; return per-turn reports."""
    reports = []
    for turn in range(first, last + 1):
        messages.append(user_message(turn))
        text, tokens = session.chat(messages, max_tokens=max_tokens)
        info = session.last
        reports.append({
            "turn": turn, "prompt": info.prompt_tokens, "cached": info.cached_tokens,
            "source": info.source, "share": info.hit_share, "tokens": tokens,
        })
        messages.append(assistant_message(turn, text))
    return reports


def main(args):
    import kvstore

    with open(args["history"]) as f:
        messages = json.load(f)
    session = kvstore.PromptSession(args["model"], store=args["store"])
    try:
        reports = play(session, messages, args["first"], args["last"], args.get("max_tokens", 8))
    finally:
        session.close()
    print(json.dumps({"reports": reports}))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
