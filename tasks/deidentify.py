"""De-identification (HyperCLOVA's corpus: "공개 범위로 인해 수집된 개인정보를 비식별화 혹은 제거"): Korean personal
identifiers in crawled text become placeholders, so that a model cannot learn and repeat them.

    kind            example                                   placeholder
    rrn             주민등록번호 900101-1234567               <주민번호>
    card            1234-5678-9012-3456                       <카드번호>
    email           hong.gildong@example.co.kr                <이메일>
    phone           010-1234-5678, 02-123-4567, +82 10 1234 5678   <전화번호>
    account         계좌 110-123-456789 (after 계좌/입금/송금)  <계좌번호>
    ip              192.168.0.1                               <IP주소>

The patterns are anchored on digit boundaries, so dates (2021-05-23), prices (12,000원), years and ordinary numbers
stay. Bank account numbers have no fixed shape and look like other numbers, so only a number after a word that
announces one (계좌, 입금, 송금) is replaced.
"""

import collections
import re
from typing import Counter, Tuple

_NOT_DIGIT_BEFORE, _NOT_DIGIT_AFTER = r"(?<![\d-])", r"(?![\d-])"
PATTERNS = (  # applied in this order: a card number must not be read as two phone numbers
    ("rrn", "<주민번호>", re.compile(_NOT_DIGIT_BEFORE + r"\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\s?-\s?[1-4]\d{6}"
                                    + _NOT_DIGIT_AFTER)),
    ("card", "<카드번호>", re.compile(_NOT_DIGIT_BEFORE + r"\d{4}(?:[- ]\d{4}){3}" + _NOT_DIGIT_AFTER)),
    ("email", "<이메일>", re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")),
    ("phone", "<전화번호>", re.compile(
        r"(?:\+82[- ]?(?:0?1[016789]|0?[2-6]\d?)[- .]?\d{3,4}[- .]?\d{4}"
        + r"|" + _NOT_DIGIT_BEFORE + r"01[016789][- .]?\d{3,4}[- .]?\d{4}"
        + r"|" + _NOT_DIGIT_BEFORE + r"0(?:2|[3-6][1-5]|70)[- .)]\d{3,4}[- .]\d{4})" + _NOT_DIGIT_AFTER)),
    ("account", "<계좌번호>", re.compile(r"(?<=계좌|입금|송금)([^\d\n]{0,10})\d{2,6}(?:-\d{2,7}){1,3}" + _NOT_DIGIT_AFTER)),
    ("ip", "<IP주소>", re.compile(r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)(?![\d.])")),
)


def deidentify(text: str) -> Tuple[str, Counter]:
    """`text` with every identifier replaced by its placeholder, and how many of each kind were replaced."""
    counts: Counter = collections.Counter()
    for kind, placeholder, pattern in PATTERNS:
        keep_prefix = kind == "account"  # the words between 계좌 and the number stay

        def replace(match, placeholder=placeholder, keep_prefix=keep_prefix):
            return (match.group(1) if keep_prefix else "") + placeholder

        text, n = pattern.subn(replace, text)
        if n:
            counts[kind] += n
    return text, counts
