"""Low-quality document filters (HyperCLOVA's corpus: "의미없는 단어나열, 비속어나 유해정보, 홍보글 등 저품질 문서
필터링"): each rule looks at one property and names itself when it rejects a document.

    rule           rejects a document that ...
    too_short      has fewer than `min_chars` non-space characters
    not_text       has fewer than half of its non-space characters letters (tables of numbers, symbol art, code)
    word_list      is a list rather than prose: at least 8 lines, 70% or more of them of at most 3 words, and
                   hardly any sentence ending (fewer than one per 10 lines)
    repetitive     repeats itself: among 30 or more words, its most frequent word is over 30% of them, or fewer
                   than 30% of its lines are distinct
    profanity      holds profanity: 2 or more hits of the lexicon below (a word inside a longer word counts)
    promotional    advertises: 3 or more promotional phrases, together with a phone number, a messenger ID or a URL

The lexicons are short and explicit on purpose; a corpus with other needs replaces them through `QualityRules`.
"""

import collections
import dataclasses
import re
from typing import Optional, Tuple

# Substrings that are not inside ordinary words: 시발 (시발점, "starting point") and 졸라 (졸라매다) are left out.
PROFANITY = ("씨발", "씨바", "ㅅㅂ", "ㅆㅂ", "개새끼", "개새기", "병신", "ㅂㅅ", "좆", "존나", "지랄", "미친놈",
             "미친년", "꺼져", "닥쳐", "썅")
PROMOTION = ("카톡", "카카오톡", "텔레그램", "문의", "상담", "할인", "무료", "이벤트", "클릭", "바로가기", "최저가",
             "당일", "대출", "특가", "쿠폰", "가입", "010", "링크", "100%")
CONTACT = re.compile(r"https?://|www\.|\d{2,3}[- .]?\d{3,4}[- .]?\d{4}|@[A-Za-z0-9_]{3,}|ID\s*:", re.IGNORECASE)
SENTENCE_END = re.compile(r"[.!?。]|[다요죠까네]\s*$", re.MULTILINE)


@dataclasses.dataclass(frozen=True)
class QualityRules:
    min_chars: int = 50
    profanity: Tuple[str, ...] = PROFANITY
    promotion: Tuple[str, ...] = PROMOTION

    def reject(self, text: str) -> Optional[str]:
        """The name of the first rule `text` fails, or None when it passes all."""
        compact = re.sub(r"\s", "", text)
        if len(compact) < self.min_chars:
            return "too_short"
        if sum(c.isalpha() for c in compact) < 0.5 * len(compact):
            return "not_text"
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if (len(lines) >= 8 and sum(len(line.split()) <= 3 for line in lines) >= 0.7 * len(lines)
                and len(SENTENCE_END.findall(text)) < len(lines) / 10):
            return "word_list"
        words = text.split()
        if len(words) >= 30 and collections.Counter(words).most_common(1)[0][1] > 0.3 * len(words):
            return "repetitive"
        if len(lines) >= 10 and len(set(lines)) < 0.3 * len(lines):
            return "repetitive"
        if sum(text.count(word) for word in self.profanity) >= 2:
            return "profanity"
        if sum(phrase in text for phrase in self.promotion) >= 3 and CONTACT.search(text):
            return "promotional"
        return None
