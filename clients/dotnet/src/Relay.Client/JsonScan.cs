using System;
using System.Collections.Generic;
using System.Globalization;
using System.Text;

namespace Relay.Client
{
    /// <summary>
    /// Splits a JSON object into its members' raw text. The client reads the frame's
    /// scalars from it and hands <c>data</c> to the app exactly as the server sent it: no
    /// re-serialization, so no date or number is reinterpreted on the way.
    /// </summary>
    internal static class JsonScan
    {
        /// <summary>The members of the top-level object: decoded key → raw JSON value.</summary>
        public static Dictionary<string, string> Members(string text)
        {
            var members = new Dictionary<string, string>(StringComparer.Ordinal);
            int i = SkipSpace(text, 0);
            Expect(text, i, '{');
            i = SkipSpace(text, i + 1);
            if (At(text, i) == '}')
            {
                Trailing(text, i + 1);
                return members;
            }
            while (true)
            {
                Expect(text, i, '"');
                int keyEnd = SkipString(text, i);
                string key = DecodeString(text.Substring(i, keyEnd - i));
                i = SkipSpace(text, keyEnd);
                Expect(text, i, ':');
                int start = SkipSpace(text, i + 1);
                int end = SkipValue(text, start);
                members[key] = text.Substring(start, end - start);
                i = SkipSpace(text, end);
                char c = At(text, i);
                if (c == ',')
                {
                    i = SkipSpace(text, i + 1);
                    continue;
                }
                Expect(text, i, '}');
                Trailing(text, i + 1);
                return members;
            }
        }

        /// <summary>A raw JSON string literal (quotes included) as .NET text.</summary>
        public static string DecodeString(string raw)
        {
            if (raw.Length < 2 || raw[0] != '"' || raw[raw.Length - 1] != '"')
                throw new FormatException("not a JSON string");
            if (raw.IndexOf('\\') < 0)
                return raw.Substring(1, raw.Length - 2);
            var sb = new StringBuilder(raw.Length);
            for (int i = 1; i < raw.Length - 1; i++)
            {
                char c = raw[i];
                if (c != '\\')
                {
                    sb.Append(c);
                    continue;
                }
                char e = raw[++i];
                switch (e)
                {
                    case '"': sb.Append('"'); break;
                    case '\\': sb.Append('\\'); break;
                    case '/': sb.Append('/'); break;
                    case 'b': sb.Append('\b'); break;
                    case 'f': sb.Append('\f'); break;
                    case 'n': sb.Append('\n'); break;
                    case 'r': sb.Append('\r'); break;
                    case 't': sb.Append('\t'); break;
                    case 'u':
                        if (i + 4 >= raw.Length)
                            throw new FormatException("truncated \\u escape");
                        sb.Append((char)int.Parse(raw.Substring(i + 1, 4), NumberStyles.HexNumber, CultureInfo.InvariantCulture));
                        i += 4;
                        break;
                    default:
                        throw new FormatException("bad escape in a JSON string");
                }
            }
            return sb.ToString();
        }

        /// <summary>A string member, or null when absent or JSON null.</summary>
        public static string String(Dictionary<string, string> members, string name)
        {
            string raw;
            if (!members.TryGetValue(name, out raw) || raw == "null")
                return null;
            return DecodeString(raw);
        }

        public static bool? Bool(Dictionary<string, string> members, string name)
        {
            string raw;
            if (!members.TryGetValue(name, out raw))
                return null;
            if (raw == "true")
                return true;
            if (raw == "false")
                return false;
            return null;
        }

        public static double? Number(Dictionary<string, string> members, string name)
        {
            string raw;
            double value;
            if (!members.TryGetValue(name, out raw))
                return null;
            if (double.TryParse(raw, NumberStyles.Float, CultureInfo.InvariantCulture, out value))
                return value;
            return null;
        }

        /// <summary>Text as a JSON string literal, quotes included.</summary>
        public static string Quote(string text)
        {
            var sb = new StringBuilder(text.Length + 2);
            sb.Append('"');
            foreach (char c in text)
            {
                switch (c)
                {
                    case '"': sb.Append("\\\""); break;
                    case '\\': sb.Append("\\\\"); break;
                    case '\n': sb.Append("\\n"); break;
                    case '\r': sb.Append("\\r"); break;
                    case '\t': sb.Append("\\t"); break;
                    default:
                        if (c < 0x20)
                            sb.Append("\\u").Append(((int)c).ToString("x4", CultureInfo.InvariantCulture));
                        else
                            sb.Append(c);
                        break;
                }
            }
            sb.Append('"');
            return sb.ToString();
        }

        private static char At(string text, int i)
        {
            if (i >= text.Length)
                throw new FormatException("JSON ends early");
            return text[i];
        }

        private static void Expect(string text, int i, char c)
        {
            if (At(text, i) != c)
                throw new FormatException("expected '" + c + "' at " + i);
        }

        private static void Trailing(string text, int i)
        {
            if (SkipSpace(text, i) != text.Length)
                throw new FormatException("text after the JSON object");
        }

        private static int SkipSpace(string text, int i)
        {
            while (i < text.Length && (text[i] == ' ' || text[i] == '\t' || text[i] == '\n' || text[i] == '\r'))
                i++;
            return i;
        }

        /// <summary>From the opening quote to just past the closing one.</summary>
        private static int SkipString(string text, int i)
        {
            for (i++; i < text.Length; i++)
            {
                char c = text[i];
                if (c == '\\')
                    i++;
                else if (c == '"')
                    return i + 1;
            }
            throw new FormatException("unterminated JSON string");
        }

        /// <summary>Just past the value starting at <paramref name="i"/>.</summary>
        private static int SkipValue(string text, int i)
        {
            char c = At(text, i);
            if (c == '"')
                return SkipString(text, i);
            if (c == '{' || c == '[')
            {
                int depth = 0;
                for (; i < text.Length; i++)
                {
                    c = text[i];
                    if (c == '"')
                    {
                        i = SkipString(text, i) - 1;
                    }
                    else if (c == '{' || c == '[')
                    {
                        depth++;
                    }
                    else if (c == '}' || c == ']')
                    {
                        if (--depth == 0)
                            return i + 1;
                    }
                }
                throw new FormatException("unterminated JSON value");
            }
            int start = i;
            while (i < text.Length && text[i] != ',' && text[i] != '}' && text[i] != ']'
                   && text[i] != ' ' && text[i] != '\t' && text[i] != '\n' && text[i] != '\r')
                i++;
            if (i == start)
                throw new FormatException("empty JSON value");
            return i;
        }
    }
}
