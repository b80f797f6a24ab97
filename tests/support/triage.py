"""Shared helpers for the triage and HL7 tests: a small label set with rules, classifications, and a
real MLLP receiver (hl7apy's own MLLP server) on 127.0.0.1 that parses every message in strict
HL7 v2.5.1 validation and answers as scripted (AA, AE, AR, or dropping the connection)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.mllp import AbstractHandler, MLLPServer
from hl7apy.parser import parse_message

from medgemma_deploy import domain
from medgemma_deploy.listener.mllp import frame

FINDINGS = (
    domain.FindingDefinition(
        "pneumothorax", "Pneumothorax", domain.Code("36118008", "SCT", "Pneumothorax"), ("p",), ("n",)
    ),
    domain.FindingDefinition(
        "consolidation", "Consolidation", domain.Code("95436008", "SCT", "Consolidation"), ("p",), ("n",)
    ),
    domain.FindingDefinition(
        "fracture", "Fracture", domain.Code("125605004", "SCT", "Fracture of bone"), ("p",), ("n",)
    ),
)
RULES = (
    domain.TriageRule("pneumothorax", 0.6, domain.TriagePriority.STAT),
    domain.TriageRule("consolidation", 0.7, domain.TriagePriority.URGENT),
)


def classification(
    probabilities: dict[str, float], series_uid: str = "1.2.3.1"
) -> domain.SeriesClassification:
    label_set = domain.LabelSet("triage-set", "1", ("CR",), (), "softmax", 0.5, FINDINGS, RULES)
    series = domain.Series("1.2.3", series_uid, "CR", "CHEST", [])
    scores = [
        domain.FindingScore(f, probabilities.get(f.key, 0.0), probabilities.get(f.key, 0.0) >= 0.5, [0.0], 0)
        for f in FINDINGS
    ]
    return domain.SeriesClassification(
        series, label_set, domain.ModelIdentity("medsiglip", "v1", Path("m")), scores
    )


class _Receiver(AbstractHandler):
    """Acknowledges like an interface engine: MSA-1 from the server's script, MSA-2 the control id."""

    def reply(self) -> str:
        server = threading.current_thread().server  # type: ignore[attr-defined]
        incoming = parse_message(self.incoming_message, validation_level=VALIDATION_LEVEL.STRICT)
        incoming.validate()
        code = server.codes.pop(0) if server.codes else "AA"
        server.received.append(incoming)
        server.answers.append(code)
        if code == "DROP":
            raise ConnectionAbortedError("dropping the connection without an answer")
        ack = Message("ACK", version="2.5.1")
        ack.msh.msh_9 = "ACK^R01^ACK"
        ack.msh.msh_10 = "ACK1"
        ack.msh.msh_11 = "P"
        ack.msa.msa_1 = code
        ack.msa.msa_2 = server.acknowledge or incoming.msh.msh_10.to_er7()
        if code != "AA":
            ack.msa.msa_3 = "patient not found"
        return frame(ack.to_er7()).decode("utf-8")


@contextmanager
def running_mllp_receiver(port: int = 0) -> Iterator[MLLPServer]:
    """hl7apy's MLLP server on 127.0.0.1 (``port`` 0: an ephemeral one), stopped on exit.

    ``received`` holds every message that parsed in strict v2.5.1 validation, ``answers`` the code
    each got; put codes in ``codes`` ("AE", "AR", "DROP") to script the next answers (then AA),
    and a control id in ``acknowledge`` to acknowledge another message.
    """
    server = MLLPServer("127.0.0.1", port, {"ORU^R01^ORU_R01": (_Receiver,)}, timeout=5)
    server.received, server.answers, server.codes, server.acknowledge = [], [], [], None
    # The handler finds its server through the thread that serves the connection.
    original = server.process_request_thread

    def process(request: object, address: object) -> None:
        threading.current_thread().server = server  # type: ignore[attr-defined]
        original(request, address)

    server.process_request_thread = process  # type: ignore[method-assign]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
