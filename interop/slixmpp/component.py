#!/usr/bin/env python3
"""External component scenarios (XEP-0114) for Rookery, driven by slixmpp's
ComponentXMPP (an echo component) and ClientXMPP users.

Run by crates/rookery-test-support/tests/interop_slixmpp.rs against one node
(component and users on the same node) and against a cluster (the component
on one node, the users on another); writes one result per scenario to --out
as JSON. The accounts alice and bob (password "secret") exist beforehand.
"""

import argparse
import asyncio
import logging
import ssl
import sys

import slixmpp
from slixmpp.componentxmpp import ComponentXMPP

import scenarios

DOMAIN = "localhost"
ECHO = "echo.localhost"
SECRET = "s3cret-for-slixmpp"
TIMEOUT = 15


# Every connection a scenario opened, closed after it whatever happened.
OPEN = []


class Echo(ComponentXMPP):
    """Echoes chat messages back and records what else it gets."""

    def __init__(self, args, secret=SECRET):
        super().__init__(ECHO, secret, args.host, args.component_port)
        OPEN.append(self)
        self.register_plugin("xep_0030")
        self["xep_0030"].add_identity(category="component", itype="generic", name="Echo", jid=ECHO)
        self.started = asyncio.Event()
        self.presences = asyncio.Queue()
        self.errors = asyncio.Queue()
        self.add_event_handler("session_start", lambda _: self.started.set())
        self.add_event_handler("message", self._message)
        self.add_event_handler("presence", lambda p: self.presences.put_nowait(p))
        self.add_event_handler("stream_error", lambda e: self.errors.put_nowait(e))

    def _message(self, msg):
        if msg["type"] in ("chat", "normal") and msg["body"]:
            msg.reply(f"echo: {msg['body']}").send()

    async def online(self):
        self.connect()
        await asyncio.wait_for(self.started.wait(), TIMEOUT)
        return self

    async def refused(self):
        """Connects expecting a stream error; returns its condition."""
        self.connect()
        error = await asyncio.wait_for(self.errors.get(), TIMEOUT)
        assert not self.started.is_set(), "the handshake was accepted"
        return error["condition"]

    async def stop(self):
        self.disconnect()
        await self.disconnected


class User(slixmpp.ClientXMPP):
    def __init__(self, name, args):
        super().__init__(f"{name}@{DOMAIN}/slix", "secret")
        OPEN.append(self)
        self.ssl_context = ssl.create_default_context(cafile=args.ca)
        self.enable_plaintext = False
        self.register_plugin("xep_0030")
        self.messages = asyncio.Queue()
        self.started = asyncio.Event()
        self.add_event_handler("session_start", self._session_start)
        self.add_event_handler("message", lambda msg: self.messages.put_nowait(msg))
        self.args = args

    async def _session_start(self, _event):
        self.send_presence()
        await self.get_roster()
        self.started.set()

    async def online(self):
        self.connect(self.args.host, self.args.client_port)
        await asyncio.wait_for(self.started.wait(), TIMEOUT)
        return self

    async def next_message(self):
        return await asyncio.wait_for(self.messages.get(), TIMEOUT)

    async def stop(self):
        self.disconnect()
        await self.disconnected


async def echo_both_ways(args):
    echo = await Echo(args).online()
    alice = await User("alice", args).online()
    for n in range(5):
        alice.send_message(mto=ECHO, mbody=f"hello {n}", mtype="chat")
    for n in range(5):
        reply = await alice.next_message()
        assert str(reply["from"]) == ECHO, reply
        assert reply["body"] == f"echo: hello {n}", reply
    alice.send_message(mto=f"bot@{ECHO}/r", mbody="to an entity at it", mtype="chat")
    reply = await alice.next_message()
    assert str(reply["from"]) == f"bot@{ECHO}/r", reply
    await alice.stop()
    await echo.stop()


async def disco_of_the_component(args):
    echo = await Echo(args).online()
    alice = await User("alice", args).online()
    items = await alice["xep_0030"].get_items(jid=DOMAIN, timeout=TIMEOUT)
    listed = [jid for (jid, _, _) in items["disco_items"]["items"]]
    assert ECHO in listed, listed
    info = await alice["xep_0030"].get_info(jid=ECHO, timeout=TIMEOUT)
    identities = info["disco_info"]["identities"]
    assert any(category == "component" for (category, _, _, _) in identities), identities
    await alice.stop()
    await echo.stop()


async def component_subscribes_to_a_user(args):
    echo = await Echo(args).online()
    alice = await User("alice", args).online()
    # slixmpp approves subscription requests by default.
    echo.send_presence(pto=f"alice@{DOMAIN}", pfrom=ECHO, ptype="subscribe")
    while True:
        presence = await asyncio.wait_for(echo.presences.get(), TIMEOUT)
        if presence["type"] == "subscribed":
            assert str(presence["from"]) == f"alice@{DOMAIN}", presence
            break
    # The roster push (or, with roster versioning, nothing newer than it)
    # brings the item to slixmpp's own copy of the roster.
    await alice.get_roster()
    subscription = lambda: alice.client_roster[ECHO]["subscription"]
    for _ in range(TIMEOUT * 20):
        if subscription() in ("from", "both"):
            break
        await asyncio.sleep(0.05)
    assert subscription() in ("from", "both"), subscription()
    await alice.stop()
    await echo.stop()


async def message_to_an_offline_user(args):
    echo = await Echo(args).online()
    echo.send_message(mto=f"bob@{DOMAIN}", mfrom=f"news@{ECHO}", mbody="while you were out", mtype="chat")
    # The echo component has nothing to wait for; give the message its way.
    await asyncio.sleep(0.5)
    await echo.stop()
    bob = await User("bob", args).online()
    message = await bob.next_message()
    assert str(message["from"]) == f"news@{ECHO}", message
    assert message["body"] == "while you were out", message
    await bob.stop()


async def wrong_secret(args):
    condition = await Echo(args, secret="guess").refused()
    assert condition == "not-authorized", condition


async def second_connection_conflicts(args):
    echo = await Echo(args).online()
    condition = await Echo(args).refused()
    assert condition == "conflict", condition
    await echo.stop()


async def component_away(args):
    alice = await User("alice", args).online()
    message = alice.make_message(mto=ECHO, mbody="anyone?", mtype="chat")
    message.send()
    error = await alice.next_message()
    assert error["type"] == "error", error
    assert error["error"]["condition"] == "service-unavailable", error
    await alice.stop()


SCENARIOS = [
    echo_both_ways,
    disco_of_the_component,
    component_subscribes_to_a_user,
    message_to_an_offline_user,
    wrong_secret,
    second_connection_conflicts,
    component_away,
]


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--component-port", type=int, required=True)
    parser.add_argument("--client-port", type=int, required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    async def close_all():
        for xmpp in OPEN:
            xmpp.disconnect()
        OPEN.clear()
        # A component that just left is unregistered a moment later on other nodes.
        await asyncio.sleep(0.5)

    await scenarios.run(SCENARIOS, args, TIMEOUT * 3, after_each=close_all)


if __name__ == "__main__":
    asyncio.run(main())
    sys.exit(0)
