"""A scripted agent loop for the session and server tests, in or out of process.

A system prompt with tools, a user task, then rounds of: the model's reply
(sent back as the assistant message mlx_lm.server returns, as an agent
client does) and a tool result. Run as ``python tests/agent.py JSON-ARGS``
to play rounds in a new process (model dir, store path, history file,
task, rounds); it prints one JSON line with the per-request reports and
writes the grown history back to the file.
"""

import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SYSTEM = (
    "You are a careful coding agent working in a repository. Use the tools to read files, search the code "
    "and run the tests before you answer. Keep every change small, explain what you changed and why, and "
    "never guess a file's contents: read it first. When a test fails, read the failure, find the cause, fix "
    "it and run the tests again. Report what you did in a few plain sentences at the end of each task."
)
TOOLS = [
    {"type": "function", "function": {"name": "read_file", "description": "Read a file of the repository.",
                                      "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "run_tests", "description": "Run the tests matching a pattern.",
                                      "parameters": {"type": "object", "properties": {"pattern": {"type": "string"}}}}},
]
WORDS = "file test line error module value return check cache token build read write path".split()


def task(k):
    return {"role": "user", "content": f"Task {k}: the test of module {k} fails; find out why and fix it."}


def tool_result(k, r):
    rng = random.Random(100 * k + r)
    return {"role": "tool", "content": " ".join(rng.choice(WORDS) for _ in range(12))}


def play_session(session, messages, k, rounds, new_task=True, max_tokens=16):
    """Play ``rounds`` requests of task ``k`` on ``messages``; return per-request reports.

    With ``new_task`` the first request is the user's task; every other one
    follows a tool result. The reply goes back as the session reports it
    (``last.reply``).
    """
    if new_task:
        messages.append(task(k))
    reports = []
    for r in range(rounds):
        session.chat(messages, max_tokens=max_tokens, tools=TOOLS)
        info = session.last
        reports.append({"task": k, "round": r, "prompt": info.prompt_tokens, "cached": info.cached_tokens,
                        "source": info.source, "resume": info.resume_tokens})
        messages.append(info.reply)
        messages.append(tool_result(k, r))
    return reports


def main(args):
    import kvstore

    with open(args["history"]) as f:
        messages = json.load(f)
    session = kvstore.PromptSession(args["model"], store=args["store"], persist=("system", "user", "assistant"))
    try:
        reports = play_session(session, messages, args["task"], args["rounds"], args["new_task"])
    finally:
        session.close()
    with open(args["history"], "w") as f:
        json.dump(messages, f)
    print(json.dumps({"reports": reports}))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
