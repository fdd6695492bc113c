"""One "host" of the remote-tier tests: a process with its own local store.

Run as ``python tests/remote_host.py JSON``: opens its store with the remote
behind it, stores the ``put`` prompts (prefilled with the real tiny model),
fetches the ``fetch`` prompts (each finished by a prefill and compared with a
cold prefill), waits for its background work and prints one JSON line.
"""

import json
import os
import sys

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import kvstore  # noqa: E402
from kvstore.remote import attach  # noqa: E402


def main(args):
    import mlx_lm

    model, _ = mlx_lm.load(args["model"])
    fp = kvstore.fingerprint(args["model"])
    store = kvstore.SnapshotStore(args["store"], block_tokens=args.get("block", 16))
    attach(store, args["url"], **args.get("remote", {}))
    out = {"puts": [], "fetches": []}
    for toks in args.get("put", []):
        cache = make_prompt_cache(model)
        mx.eval(model(mx.array(toks)[None], cache=cache))
        out["puts"].append(store.put(fp, toks, cache, args.get("tier", "system"), tenant=args.get("tenant")))
    for toks in args.get("fetch", []):
        cache, rest, match = store.fetch(fp, toks, tenant=args.get("tenant"))
        got = {"source": match.source if match else None, "tokens": match.tokens if match else 0}
        if cache is None:
            cache, rest = make_prompt_cache(model), toks
        warm = model(mx.array(rest)[None], cache=cache)[0, -1]
        cold = model(mx.array(toks)[None], cache=make_prompt_cache(model))[0, -1]
        got["max_diff"] = float(mx.abs(warm - cold).max())
        out["fetches"].append(got)
    store.remote.flush(60)
    out["remote"] = store.remote.stats()
    out["local"] = len(store.entries())
    store.close()
    return out


if __name__ == "__main__":
    print(json.dumps({"result": main(json.loads(sys.argv[1]))}), flush=True)
