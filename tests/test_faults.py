"""Faults during live reconfiguration under streaming load (executor/bench_faults.py, short): one
case per fast fault kind. No request may be lost or silently altered, and every fault before the
commit must leave the old plan serving, its workers on their old layers, and the destination able
to take part in the next (fault-free) reconfiguration."""
from executor.bench_faults import run


def test_faults_before_the_commit_abort_cleanly_and_lose_nothing():
    res = run(cases=[("cut", "preparing"), ("cut", "pre-copying"),
                     # a cut in the switch: the source commits, the destination fails its commit; the
                     # abort must undo the source's commit, or the next step finds it on the new layers
                     ("cut", "switching"),
                     # a destination killed as the switch starts: the other nodes' commit replies must
                     # still be read and their commits undone, or the driver hangs on their channels
                     ("kill", "switching"),
                     ("timeout", "preparing"),
                     # stopped as the switch starts: its commit is not waited for past the switch's
                     # deadline; the others' commits are undone and the old plan serves at once
                     ("timeout", "switching"),
                     # the destination out of memory as it builds its new stage (a real allocation
                     # failure): aborted, and the node can still take the next reconfiguration
                     ("oom", "preparing")], quiet=True)
    # the transfer timeout is calibrated to this machine's pace: every fault hit its own phase
    # (a timeout that fires first would abort the case before the fault, and prove nothing of it)
    assert res["faults_fired"] == res["cases"] == 7, res
    assert res["lost"] == 0 and res["altered"] == 0 and res["hung"] == 0
    assert res["failed_unclear"] == 0
    for kind, by in res["by_phase"].items():
        for phase, r in by.items():
            assert r["aborted_cleanly"] == r["cases"] == 1, (kind, phase, r)
            assert r["old_plan_kept_pre_switch"] == "1/1" and r["serving_after"] == "1/1", (kind, phase, r)
    assert res["kinds"]["cut"]["recovered"] == "3/3"      # the channel stayed in step after the cut
    # oneDNN's failure to allocate stays with the thread it hit: the next build must not inherit it
    assert res["kinds"]["oom"]["recovered"] == "1/1", res["kinds"]["oom"]
    assert res["reconfigurations"] >= 9


def test_a_serving_node_killed_after_the_switch_ends_the_reconfiguration_with_a_clear_error():
    """Killed in cleanup, the destination already serves the new plan: the requests in flight fail
    with an error naming it (none lost, none altered) and the reconfiguration ends at once with that
    error, instead of staying in `cleaning` until its waiter gives up."""
    res = run(cases=[("kill", "cleaning")], quiet=True)
    r = res["by_phase"]["kill"]["cleaning"]
    assert res["faults_fired"] == 1
    assert res["lost"] == 0 and res["altered"] == 0 and res["failed_unclear"] == 0
    assert r["hung"] == 0 and r["completed"] == 1 and r["serving_after"] == "0/1"
    assert res["failed_clear"] > 0
