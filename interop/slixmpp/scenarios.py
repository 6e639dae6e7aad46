"""What every interop script shares: run scenarios one after another and
write one result per scenario as JSON (read by
crates/rookery-test-support/tests/interop_slixmpp.rs)."""

import asyncio
import json
import traceback


async def run(scenarios, args, timeout, after_each=None):
    """Runs each scenario (an async function of args) within timeout seconds;
    a failure is a result, not the end. after_each (async, optional) runs
    after every scenario, whatever happened."""
    results = {}
    for scenario in scenarios:
        try:
            await asyncio.wait_for(scenario(args), timeout)
            results[scenario.__name__] = {"result": "pass"}
        except BaseException as error:  # noqa: BLE001 - every failure is a result
            results[scenario.__name__] = {"result": "fail", "error": f"{type(error).__name__}: {error}"}
            traceback.print_exc()
        if after_each is not None:
            await after_each()
    with open(args.out, "w", encoding="utf-8") as out:
        json.dump(results, out, indent=2, sort_keys=True)
    print(json.dumps(results, indent=2, sort_keys=True))
