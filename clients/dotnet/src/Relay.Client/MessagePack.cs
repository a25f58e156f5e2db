using System;
using System.Collections.Generic;
using System.Globalization;
using System.IO;
using System.Text;

namespace Relay.Client
{
    /// <summary>
    /// The MessagePack subset Relay speaks, with no dependency: a reader into plain .NET
    /// values (null, bool, long, ulong, double, string, byte[], List, Dictionary) and a
    /// writer for the client's own frames (maps of strings). <see cref="ToJson"/> turns a
    /// decoded value into JSON text, so the app sees <c>DataJson</c> in both formats.
    /// </summary>
    public static class MessagePack
    {
        private static readonly UTF8Encoding Utf8 = new UTF8Encoding(false, true);

        /// <summary>Decodes one value that fills <paramref name="count"/> bytes exactly.</summary>
        public static object Decode(byte[] buffer, int count)
        {
            int offset = 0;
            object value = Read(buffer, count, ref offset, 0);
            if (offset != count)
                throw new FormatException("bytes after the MessagePack value");
            return value;
        }

        public static object Decode(byte[] buffer)
        {
            return Decode(buffer, buffer.Length);
        }

        /// <summary>A map of string keys and string values, as the client sends its frames.</summary>
        public static byte[] EncodeStringMap(IList<KeyValuePair<string, string>> pairs)
        {
            var stream = new MemoryStream();
            WriteMapHeader(stream, pairs.Count);
            foreach (var pair in pairs)
            {
                WriteString(stream, pair.Key);
                WriteString(stream, pair.Value);
            }
            return stream.ToArray();
        }

        /// <summary>A decoded value as compact JSON (byte strings and extensions as base64).</summary>
        public static string ToJson(object value)
        {
            var sb = new StringBuilder();
            AppendJson(sb, value);
            return sb.ToString();
        }

        // -- reading ---------------------------------------------------------------------

        private const int MaxDepth = 512;

        private static object Read(byte[] b, int count, ref int i, int depth)
        {
            if (depth > MaxDepth)
                throw new FormatException("MessagePack nested too deep");
            Take(b, count, ref i, 1);
            byte head = b[i - 1];
            if (head <= 0x7f)
                return (long)head;
            if (head >= 0xe0)
                return (long)(sbyte)head;
            if (head >= 0x80 && head <= 0x8f)
                return ReadMap(b, count, ref i, head & 0x0f, depth);
            if (head >= 0x90 && head <= 0x9f)
                return ReadArray(b, count, ref i, head & 0x0f, depth);
            if (head >= 0xa0 && head <= 0xbf)
                return ReadString(b, count, ref i, head & 0x1f);
            switch (head)
            {
                case 0xc0: return null;
                case 0xc2: return false;
                case 0xc3: return true;
                case 0xc4: return ReadBytes(b, count, ref i, (int)ReadUInt(b, count, ref i, 1));
                case 0xc5: return ReadBytes(b, count, ref i, (int)ReadUInt(b, count, ref i, 2));
                case 0xc6: return ReadBytes(b, count, ref i, Length(ReadUInt(b, count, ref i, 4)));
                case 0xc7: return ReadExt(b, count, ref i, (int)ReadUInt(b, count, ref i, 1));
                case 0xc8: return ReadExt(b, count, ref i, (int)ReadUInt(b, count, ref i, 2));
                case 0xc9: return ReadExt(b, count, ref i, Length(ReadUInt(b, count, ref i, 4)));
                case 0xca:
                {
                    byte[] four = BigEndian(b, count, ref i, 4);
                    return (double)BitConverter.ToSingle(four, 0);
                }
                case 0xcb:
                {
                    byte[] eight = BigEndian(b, count, ref i, 8);
                    return BitConverter.ToDouble(eight, 0);
                }
                case 0xcc: return (long)ReadUInt(b, count, ref i, 1);
                case 0xcd: return (long)ReadUInt(b, count, ref i, 2);
                case 0xce: return (long)ReadUInt(b, count, ref i, 4);
                case 0xcf:
                {
                    ulong u = ReadUInt(b, count, ref i, 8);
                    return u <= long.MaxValue ? (object)(long)u : u;
                }
                case 0xd0: return (long)(sbyte)ReadUInt(b, count, ref i, 1);
                case 0xd1: return (long)(short)ReadUInt(b, count, ref i, 2);
                case 0xd2: return (long)(int)ReadUInt(b, count, ref i, 4);
                case 0xd3: return (long)ReadUInt(b, count, ref i, 8);
                case 0xd4: return ReadExt(b, count, ref i, 1);
                case 0xd5: return ReadExt(b, count, ref i, 2);
                case 0xd6: return ReadExt(b, count, ref i, 4);
                case 0xd7: return ReadExt(b, count, ref i, 8);
                case 0xd8: return ReadExt(b, count, ref i, 16);
                case 0xd9: return ReadString(b, count, ref i, (int)ReadUInt(b, count, ref i, 1));
                case 0xda: return ReadString(b, count, ref i, (int)ReadUInt(b, count, ref i, 2));
                case 0xdb: return ReadString(b, count, ref i, Length(ReadUInt(b, count, ref i, 4)));
                case 0xdc: return ReadArray(b, count, ref i, (int)ReadUInt(b, count, ref i, 2), depth);
                case 0xdd: return ReadArray(b, count, ref i, Length(ReadUInt(b, count, ref i, 4)), depth);
                case 0xde: return ReadMap(b, count, ref i, (int)ReadUInt(b, count, ref i, 2), depth);
                case 0xdf: return ReadMap(b, count, ref i, Length(ReadUInt(b, count, ref i, 4)), depth);
                default: throw new FormatException("unknown MessagePack type 0x" + head.ToString("x2", CultureInfo.InvariantCulture));
            }
        }

        private static int Length(ulong n)
        {
            if (n > int.MaxValue)
                throw new FormatException("MessagePack length too large");
            return (int)n;
        }

        /// <summary>Checks that <paramref name="n"/> bytes remain and moves past them.</summary>
        private static void Take(byte[] b, int count, ref int i, int n)
        {
            if (n < 0 || count - i < n)
                throw new FormatException("MessagePack value ends early");
            i += n;
        }

        private static ulong ReadUInt(byte[] b, int count, ref int i, int n)
        {
            Take(b, count, ref i, n);
            ulong value = 0;
            for (int k = i - n; k < i; k++)
                value = (value << 8) | b[k];
            return value;
        }

        private static byte[] BigEndian(byte[] b, int count, ref int i, int n)
        {
            Take(b, count, ref i, n);
            var bytes = new byte[n];
            Array.Copy(b, i - n, bytes, 0, n);
            if (BitConverter.IsLittleEndian)
                Array.Reverse(bytes);
            return bytes;
        }

        private static string ReadString(byte[] b, int count, ref int i, int n)
        {
            Take(b, count, ref i, n);
            return Utf8.GetString(b, i - n, n);
        }

        private static byte[] ReadBytes(byte[] b, int count, ref int i, int n)
        {
            Take(b, count, ref i, n);
            var bytes = new byte[n];
            Array.Copy(b, i - n, bytes, 0, n);
            return bytes;
        }

        private static byte[] ReadExt(byte[] b, int count, ref int i, int n)
        {
            Take(b, count, ref i, 1); // the extension type: Relay defines none
            return ReadBytes(b, count, ref i, n);
        }

        private static List<object> ReadArray(byte[] b, int count, ref int i, int n, int depth)
        {
            if (n > count - i)
                throw new FormatException("MessagePack array longer than its frame");
            var items = new List<object>(n);
            for (int k = 0; k < n; k++)
                items.Add(Read(b, count, ref i, depth + 1));
            return items;
        }

        private static Dictionary<string, object> ReadMap(byte[] b, int count, ref int i, int n, int depth)
        {
            if (n > count - i)
                throw new FormatException("MessagePack map longer than its frame");
            var map = new Dictionary<string, object>(n, StringComparer.Ordinal);
            for (int k = 0; k < n; k++)
            {
                object key = Read(b, count, ref i, depth + 1);
                object value = Read(b, count, ref i, depth + 1);
                string name = key as string ?? KeyText(key);
                map[name] = value;
            }
            return map;
        }

        /// <summary>JSON object keys are strings: other keys become their JSON text.</summary>
        private static string KeyText(object key)
        {
            var sb = new StringBuilder();
            AppendJson(sb, key);
            return sb.ToString();
        }

        // -- writing ---------------------------------------------------------------------

        private static void WriteMapHeader(Stream s, int n)
        {
            if (n <= 15)
            {
                s.WriteByte((byte)(0x80 | n));
            }
            else
            {
                s.WriteByte(0xde);
                s.WriteByte((byte)(n >> 8));
                s.WriteByte((byte)n);
            }
        }

        private static void WriteString(Stream s, string text)
        {
            byte[] bytes = Utf8.GetBytes(text);
            int n = bytes.Length;
            if (n <= 31)
            {
                s.WriteByte((byte)(0xa0 | n));
            }
            else if (n <= 0xff)
            {
                s.WriteByte(0xd9);
                s.WriteByte((byte)n);
            }
            else if (n <= 0xffff)
            {
                s.WriteByte(0xda);
                s.WriteByte((byte)(n >> 8));
                s.WriteByte((byte)n);
            }
            else
            {
                s.WriteByte(0xdb);
                s.WriteByte((byte)(n >> 24));
                s.WriteByte((byte)(n >> 16));
                s.WriteByte((byte)(n >> 8));
                s.WriteByte((byte)n);
            }
            s.Write(bytes, 0, n);
        }

        // -- JSON ------------------------------------------------------------------------

        private static void AppendJson(StringBuilder sb, object value)
        {
            if (value == null)
            {
                sb.Append("null");
                return;
            }
            var text = value as string;
            if (text != null)
            {
                sb.Append(JsonScan.Quote(text));
                return;
            }
            if (value is bool)
            {
                sb.Append((bool)value ? "true" : "false");
                return;
            }
            if (value is long)
            {
                sb.Append(((long)value).ToString(CultureInfo.InvariantCulture));
                return;
            }
            if (value is ulong)
            {
                sb.Append(((ulong)value).ToString(CultureInfo.InvariantCulture));
                return;
            }
            if (value is double)
            {
                sb.Append(DoubleText((double)value));
                return;
            }
            var bytes = value as byte[];
            if (bytes != null)
            {
                sb.Append('"').Append(Convert.ToBase64String(bytes)).Append('"');
                return;
            }
            var map = value as Dictionary<string, object>;
            if (map != null)
            {
                sb.Append('{');
                bool first = true;
                foreach (var pair in map)
                {
                    if (!first)
                        sb.Append(',');
                    first = false;
                    sb.Append(JsonScan.Quote(pair.Key)).Append(':');
                    AppendJson(sb, pair.Value);
                }
                sb.Append('}');
                return;
            }
            var list = value as List<object>;
            if (list != null)
            {
                sb.Append('[');
                for (int k = 0; k < list.Count; k++)
                {
                    if (k > 0)
                        sb.Append(',');
                    AppendJson(sb, list[k]);
                }
                sb.Append(']');
                return;
            }
            throw new ArgumentException("not a MessagePack value: " + value.GetType().Name);
        }

        /// <summary>Round-trip text; a float stays a float (1.0, not 1); NaN/Infinity as null.</summary>
        private static string DoubleText(double d)
        {
            if (double.IsNaN(d) || double.IsInfinity(d))
                return "null";
            string text = d.ToString("R", CultureInfo.InvariantCulture);
            if (text.IndexOf('.') < 0 && text.IndexOf('E') < 0 && text.IndexOf('e') < 0)
                text += ".0";
            return text;
        }
    }
}
