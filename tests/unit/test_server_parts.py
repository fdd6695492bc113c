"""The server's pure parts: tenants from headers, tenant-tagged model
descriptions, the prefill-rate estimate and the metrics' text format."""

import math

from mlx_lm.server import ModelDescription
from prometheus_client.parser import text_string_to_metric_families

from kvstore.metrics import ServerMetrics
from kvstore.server_cache import tenant_id, tenant_model
from kvstore.server_http import Tenancy


def test_tenant_from_header_and_key():
    both = Tenancy("X-Tenant", from_key=True)
    assert both.of({"X-Tenant": " acme "}) == "header:acme"
    assert both.of({"X-Tenant": "acme", "Authorization": "Bearer k1"}) == "header:acme"
    k1 = both.of({"Authorization": "Bearer k1"})
    assert k1.startswith("key:") and "k1" not in k1
    assert both.of({"Authorization": "bearer k1"}) == k1
    assert both.of({"X-Api-Key": "k1"}) == k1
    assert both.of({"Authorization": "Bearer k2"}) != k1
    assert both.of({}) is None and both.of({"X-Tenant": "  "}) is None
    # a header value can never alias a key's hash
    assert both.of({"X-Tenant": k1[4:]}) != k1
    assert Tenancy("X-Tenant").of({"Authorization": "Bearer k1"}) is None
    assert not Tenancy().enabled and Tenancy(from_key=True).enabled


def test_tenant_models_are_equal_only_for_one_tenant():
    base = ModelDescription("m", "default_model", None)
    a, a2, b = tenant_model(base, "t:a"), tenant_model(base, "t:a"), tenant_model(base, "t:b")
    assert a == a2 and a != b and a != base and base != a
    assert tenant_model(base, None) is base
    assert (a.model, a.draft, a.adapter, a.tenant) == ("m", "default_model", None, "t:a")
    assert tenant_id(None) == "-" and tenant_id("t:a") == tenant_id("t:a") != tenant_id("t:b")


def samples(metrics):
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(metrics.exposition().decode()) for s in fam.samples}


def test_prefill_saved_waits_for_the_first_sample():
    m = ServerMetrics()
    assert math.isnan(samples(m)[("kvstore_prefill_seconds_per_token", ())])
    m.prefilled(reused=100, prefilled=1, seconds=0.5)      # too few tokens to be a sample
    assert samples(m)[("kvstore_prefill_saved_seconds_total", ())] == 0
    m.prefilled(reused=0, prefilled=200, seconds=2.0)      # 0.01 s per token
    s = samples(m)
    assert s[("kvstore_prefill_seconds_per_token", ())] == 0.01
    assert abs(s[("kvstore_prefill_saved_seconds_total", ())] - 1.0) < 1e-9   # the 100 held tokens
    m.prefilled(reused=50, prefilled=200, seconds=6.0)     # estimate now 8 s / 400 tokens
    assert abs(samples(m)[("kvstore_prefill_saved_seconds_total", ())] - 2.0) < 1e-9


def test_write_histogram_and_cacheless_exposition():
    m = ServerMetrics()
    m.written(0.003, True)
    m.written(2.0, False)
    s = samples(m)
    assert s[("kvstore_write_seconds_bucket", (("le", "0.005"), ("outcome", "ok")))] == 1
    assert s[("kvstore_write_seconds_count", (("outcome", "failed"),))] == 1
    assert s[("kvstore_write_seconds_bucket", (("le", "1.0"), ("outcome", "failed")))] == 0
    assert s[("kvstore_writes_dropped_total", ())] == 0
    assert not any(name == "kvstore_store_bytes" for name, _ in s)
