import json
from ntp_ssl.evaluate.slc import mean_ci95
def load(path):
    return {(r["model"], r["attack"]): r["slc_auc"] for r in json.load(open(path))["summary"]}
B = "benchmarks/results/"
dense = {}
dense.update(load(B + "converged_syndigits/files_random_mask_seeded/summary.json"))
dense.update(load(B + "converged_syndigits/files_refresh_seeded_23/summary.json"))
for (m, a), v in load(B + "converged_random_ntp/files_refresh_seeded/summary.json").items():
    dense[(m + "-seed1", a)] = v
refill = load(B + "converged_syndigits/evaluate/refill_random_masks/summary.json")
for setup, name in (("random_mask_seeded", "random_mask_seeded"), ("refresh_seeded", "label_free_random_mask_refresh_seeded")):
    d = [dense[(f"{name}-seed{s}", "finetune_dense")] for s in (1, 2, 3)]
    r = [refill[(f"{setup}-seed{s}", "finetune_refill")] for s in (1, 2, 3)]
    diff = [b - a for a, b in zip(d, r)]
    best = [max(a, b) for a, b in zip(d, r)]
    f = lambda xs: "%+.3f [%+.3f, %+.3f]" % mean_ci95(xs)
    print(setup, "dense", f(d), "refill", f(r), "refill-dense", f(diff), "best", f(best))
    print("  per seed dense", ["%+.3f" % x for x in d], "refill", ["%+.3f" % x for x in r])
