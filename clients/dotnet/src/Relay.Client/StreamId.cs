using System;
using System.Globalization;

namespace Relay.Client
{
    /// <summary>
    /// A Relay message id, a Redis stream id <c>&lt;ms&gt;-&lt;seq&gt;</c>, ordered as a pair of
    /// integers. As strings <c>"9-0"</c> sorts after <c>"10-0"</c>; as ids it comes first.
    /// </summary>
    public struct StreamId : IComparable<StreamId>, IEquatable<StreamId>
    {
        private readonly ulong _ms;
        private readonly ulong _seq;

        public StreamId(ulong ms, ulong seq)
        {
            _ms = ms;
            _seq = seq;
        }

        public ulong Milliseconds { get { return _ms; } }

        public ulong Sequence { get { return _seq; } }

        /// <summary>Parses <c>&lt;ms&gt;-&lt;seq&gt;</c>, or a bare <c>&lt;ms&gt;</c> meaning <c>&lt;ms&gt;-0</c>.</summary>
        public static bool TryParse(string text, out StreamId id)
        {
            id = default(StreamId);
            if (string.IsNullOrEmpty(text))
                return false;
            int dash = text.IndexOf('-');
            string head = dash < 0 ? text : text.Substring(0, dash);
            string tail = dash < 0 ? "0" : text.Substring(dash + 1);
            ulong ms, seq;
            if (!ParsePart(head, out ms) || !ParsePart(tail, out seq))
                return false;
            id = new StreamId(ms, seq);
            return true;
        }

        public static StreamId Parse(string text)
        {
            StreamId id;
            if (!TryParse(text, out id))
                throw new FormatException("a stream id looks like '<ms>-<seq>'");
            return id;
        }

        private static bool ParsePart(string part, out ulong value)
        {
            value = 0;
            if (part.Length == 0 || part.Length > 20)
                return false;
            foreach (char c in part)
            {
                if (c < '0' || c > '9')
                    return false;
            }
            return ulong.TryParse(part, NumberStyles.None, CultureInfo.InvariantCulture, out value);
        }

        public int CompareTo(StreamId other)
        {
            int byMs = _ms.CompareTo(other._ms);
            return byMs != 0 ? byMs : _seq.CompareTo(other._seq);
        }

        public bool Equals(StreamId other)
        {
            return _ms == other._ms && _seq == other._seq;
        }

        public override bool Equals(object obj)
        {
            return obj is StreamId && Equals((StreamId)obj);
        }

        public override int GetHashCode()
        {
            return _ms.GetHashCode() * 31 + _seq.GetHashCode();
        }

        public override string ToString()
        {
            return _ms.ToString(CultureInfo.InvariantCulture) + "-" + _seq.ToString(CultureInfo.InvariantCulture);
        }

        public static bool operator <(StreamId a, StreamId b) { return a.CompareTo(b) < 0; }
        public static bool operator >(StreamId a, StreamId b) { return a.CompareTo(b) > 0; }
        public static bool operator <=(StreamId a, StreamId b) { return a.CompareTo(b) <= 0; }
        public static bool operator >=(StreamId a, StreamId b) { return a.CompareTo(b) >= 0; }
        public static bool operator ==(StreamId a, StreamId b) { return a.Equals(b); }
        public static bool operator !=(StreamId a, StreamId b) { return !a.Equals(b); }
    }
}
